#!/bin/sh
# smoke_dit.sh TYPEFACE WORKDIR: the DiT through the single commands with the
# tiny model and a few steps: pretrain (into the cache's base-dit-tiny),
# finetune with adapters on its modulation layers too, resume, on chosen
# layers only, sample, eval; then the quick modes of the multi-style and
# targets experiments on it.
set -eu
typeface=$1
work=$2
rm -rf "$work"
mkdir -p "$work"
tiny="--model tiny --arch dit --cache $work/cache"

"$typeface" pretrain $tiny --steps 12
python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); assert c["model"]["arch"] == "dit" and c["step"] == 12, c' \
  "$work/cache/base-dit-tiny/config.json"
"$typeface" finetune $tiny --steps 3 --out "$work/ft" 2>&1 | tee "$work/ft.log"
"$typeface" finetune $tiny --steps 6 --resume --out "$work/ft"
grep -q '"step": 6' "$work/ft/state.json"
# Every Linear and Conv2d of the tiny DiT (and of the text encoder and the
# condition): 2 blocks of 11, 3 around them, 3 + 6.
grep -q "adapters on 34 layers" "$work/ft.log"
python3 -c 'import json,struct,sys
f=open(sys.argv[1],"rb"); n=struct.unpack("<Q",f.read(8))[0]; h=json.loads(f.read(n))
assert "dit.block1.modulation.lora_A" in h and "dit.patchify.router.weight" in h, sorted(h)[:8]' \
  "$work/ft/adapters.safetensors"
# --targets: the attention projections only (2 blocks of 4 + 4), and a
# pattern that is no regular expression is refused before anything runs.
"$typeface" finetune $tiny --steps 2 --targets '.*attn[12]\.to_(q|k|v|out)' \
  --out "$work/ft_attention" 2>&1 | tee "$work/ft_attention.log"
grep -q "adapters on 16 layers" "$work/ft_attention.log"
"$(dirname "$0")/expect_error.sh" "expected an ECMAScript regular expression" \
  "$typeface" finetune $tiny --targets '(' --out "$work/ft_bad"
test ! -e "$work/ft_bad"
"$typeface" sample $tiny --adapter "$work/ft/adapters.safetensors" --steps 3 \
  --prompt "the letter g in lobster style" --out "$work/sample.png"
test -s "$work/sample.png"
"$typeface" judge --model tiny --cache "$work/cache" --members 1 --steps 20
"$typeface" eval $tiny --adapter "$work/ft/adapters.safetensors" --images 1 \
  --base-prompts 2 --out "$work/eval.json"
python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); assert 0 <= e["alignment_mean"] <= 1, e' \
  "$work/eval.json"
# One adapter for two styles: per-style scores, base-font prompts shared out
# (6 each, disjoint), the routers' usage and the style-mixing grid.
experiment="experiment $tiny --setting multi-style --quick --steps 4 --judge-members 1 \
  --test-prompts 4 --results $work/results"
"$typeface" $experiment
for file in summary.md metrics.json grids/style-mixing.png plots/router-usage.png; do
  test -s "$work/results/multi-style-dit/$file" ||
    { echo "FAIL: no multi-style-dit/$file" >&2; exit 1; }
done
python3 -c 'import json,sys
m=json.load(open(sys.argv[1]))
assert m["base"]["model"]["arch"] == "dit", m["base"]
assert [a["label"].split(" ")[0] for a in m["arms"]] == ["StyleInject", "LoRA", "LoRA"], m["arms"]
assert len(m["runs"]) == 3 * 2 * 2, len(m["runs"])
for r in m["runs"]:
    assert len(r["alignment"]) == 4 and len(r["retention"]) == 6, r
u=m["router_usage"]
assert sorted(u) == ["comic neue", "lobster"], sorted(u)
layer=u["lobster"]["layers"]["dit.block1.modulation"]
assert len(layer["weights"]) == 4 and abs(sum(layer["weights"]) - 1) < 1e-6, layer
assert "dit.block1" in u["lobster"]["depth"], list(u["lobster"]["depth"])' \
  "$work/results/multi-style-dit/metrics.json"
# A second run reuses every run on disk (it trains nothing).
"$typeface" $experiment 2>&1 | tee "$work/again.log"
if grep -q "finetune" "$work/again.log"; then
  echo "FAIL: the second experiment fine-tuned again" >&2
  exit 1
fi
# The targets setting: the same adapter on fewer layers, each arm's
# pattern recorded.
"$typeface" experiment $tiny --setting targets --quick --steps 4 --judge-members 1 \
  --test-prompts 4 --base-prompts 4 --results "$work/results"
python3 -c 'import json,sys
m=json.load(open(sys.argv[1]))
arms=[(a["label"], a["targets"]) for a in m["arms"]]
assert [a[0] for a in arms] == ["every layer", "attention only", "denoiser only", "no modulation"], arms
assert arms[0][1] == ".*" and "modulation" in arms[3][1], arms
p=[a["parameters"] for a in m["arms"]]
assert all(0 < x < p[0] for x in p[1:]), p' \
  "$work/results/targets-dit/metrics.json"
echo "DiT smoke run passed"
