#!/bin/sh
# peft_peer.sh BENCH PYTHON WORKDIR: examples/bench/peft_peer.py on what the
# bench writes (--quick, one round): PEFT's LoRA on every case the bench
# timed, as the bench's float32 adapters and under bfloat16 autocast.
set -eu
bench=$1
python=$2
work=$3
script=$(dirname "$0")/../../examples/bench/peft_peer.py
rm -rf "$work"
mkdir -p "$work"
"$bench" --quick --rounds 1 --json "$work/bench.json" > "$work/bench.txt"
for mode in plain autocast; do
  flag=$([ $mode = autocast ] && echo --autocast || true)
  "$python" "$script" "$work/bench.json" --rounds 1 $flag --json "$work/$mode.json"
  "$python" - "$work/bench.json" "$work/$mode.json" "$mode" <<'PY'
import json, sys
bench, peer, mode = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
cases = [r["name"].rsplit("/", 1)[0] for r in bench["layers"] if r["method"] == "lora"]
assert cases and [c["name"] for c in peer["layers"]] == cases, (cases, peer["layers"])
assert peer["autocast"] == (mode == "autocast"), peer["title"]
assert ("bfloat16 autocast" in peer["title"]) == (mode == "autocast"), peer["title"]
for c in peer["layers"]:
    assert c["train_ms"] > 0 and c["base_train_ms"] > 0 and c["train_vs_base"]["median"] > 0, c
PY
done
echo "peft_peer passed"
