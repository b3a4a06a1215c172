#!/bin/sh
# frontier.sh TYPEFACE WORKDIR: the frontier experiment's quick mode on the
# tiny UNet: every arm at two learning rates, each adapter judged at two
# strengths, the report's verdicts on every image and on the agreed ones,
# and a second run that trains and judges nothing.
set -eu
typeface=$1
work=$2
rm -rf "$work"
mkdir -p "$work"
tiny="--model tiny --cache $work/cache"

"$typeface" pretrain $tiny --steps 12
frontier="experiment $tiny --setting frontier --quick --steps 4 \
  --test-prompts 4 --base-prompts 4 --judge $work/judge --judge-members 1 \
  --judge-steps 20 --results $work/results"
"$typeface" $frontier
out="$work/results/frontier"
for file in summary.md metrics.json runs.json grids/real.png \
    grids/matched-styleinject.png grids/matched-styleinject-gate-adain.png; do
  test -s "$out/$file" || { echo "FAIL: no frontier/$file" >&2; exit 1; }
done
python3 - "$out/metrics.json" <<'PY'
import json, math, sys
m = json.load(open(sys.argv[1]))
labels = [a["label"] for a in m["arms"]]
assert labels[0] == "StyleInject" and labels[3] == "StyleInject gate adain", labels
assert labels[1].startswith("LoRA r=") and labels[2].startswith("LoRA r="), labels
# 4 arms x 2 learning rates x 2 strengths, then the base model.
points = m["points"]
assert len(points) == 4 * 2 * 2 + 1, len(points)
assert {(p["lr"], p["strength"]) for p in points[:-1]} == \
    {(lr, c) for lr in (0.001, 0.003) for c in (0.5, 1.0)}, points
assert points[-1]["arm"] == "base model" and points[-1]["strength"] == 0
# runs.json: every (point, seed) of lobster, and the base model.
runs = json.load(open(sys.argv[1].replace("metrics.json", "runs.json")))
assert len(runs) == 16 * 2 + 1, len(runs)
assert all(len(r["style_fit"]) == 4 and len(r["font_kept"]) == 4 for r in runs), runs[0]
for p in points:
    for key in ("style_fit", "font_kept", "retention", "alignment"):
        i = p[key]
        assert 0 <= i["low"] <= i["mean"] <= i["high"] <= 1, (p, key)
    assert 0 <= p["judge_agrees_test"] <= 1 and 0 <= p["judge_agrees_base"] <= 1, p
for key in ("every_image", "agreed_only"):
    for on in ("font_kept", "retention"):
        v = m["frontier"][key][on]
        assert len(v["levels"]) == 4, v
        for label in labels[1:]:
            arm = v["arms"][label]
            lead = arm["lead_at_matched_family_wise"]
            assert lead["low"] <= lead["mean"] <= lead["high"], arm
            assert arm["verdict_at_matched"] in ("better", "worse", "no difference"), arm
            assert len(arm["leads_family_wise"]) == 4 and arm["verdict_over_range"], arm
        curve = m["frontier"][key]["curves"][on]
        for label in labels:
            c = curve["arms"][label]
            assert len(c["points"]) == 4 and c["envelope"], c
            # An envelope runs from the highest retention down, style fit up.
            xs = [e[0] for e in c["envelope"]]
            ys = [e[1] for e in c["envelope"]]
            assert xs == sorted(xs, reverse=True) and ys == sorted(ys), c
            assert len(c["band_low"]) == len(curve["band_x"]) == 25, c
# A judge of one member agrees with itself on every image: counting only
# the agreed images must give the same numbers.
def close(a, b, path="frontier"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], path + "." + k)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, "%s[%d]" % (path, i))
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-9, (path, a, b)
    else:
        assert a == b, (path, a, b)
close(m["frontier"]["every_image"], m["frontier"]["agreed_only"])
assert all(p["judge_agrees_test"] == 1 and p["judge_agrees_base"] == 1 for p in points)
PY
grep -q "Verdicts, and whether they hold on the agreed images" "$out/summary.md"
if grep -q "| no |$" "$out/summary.md"; then
  echo "FAIL: a verdict did not hold with a judge that always agrees" >&2
  exit 1
fi
# A second run reads every run on disk: no fine-tune, no sampling.
"$typeface" $frontier 2>&1 | tee "$work/again.log"
if grep -q "finetune\|sample [0-9]" "$work/again.log"; then
  echo "FAIL: the second frontier experiment trained or sampled again" >&2
  exit 1
fi
# Another strength: the adapters on disk are judged there, not trained again.
"$typeface" $frontier --strengths 0.5,0.75,1 2>&1 | tee "$work/more.log"
if grep -q "finetune" "$work/more.log"; then
  echo "FAIL: a new strength trained the adapters again" >&2
  exit 1
fi
grep -q "sample [0-9]" "$work/more.log"
echo "frontier quick run passed"
