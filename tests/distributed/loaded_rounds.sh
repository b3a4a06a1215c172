#!/usr/bin/env bash
# loaded_rounds.sh ROUNDS LOAD_BUILD BUILD... : the tests that race a clock
# (the [distributed] unit tests and data_parallel.py) of every BUILD at once,
# ROUNDS times in a row, beside a build of LOAD_BUILD (a configured build
# folder) that is cleaned and rebuilt without a pause. Prints a line per
# round; keeps a failing round's logs; exits non-zero if any round failed.
# Not run by CTest: it is the check that these tests pass on a loaded
# machine (tests/README.md says when it was last run). A PyPI build's
# data_parallel.py also runs torchrun from $TORCHRUN, if set.
set -u
rounds=$1 load_build=$2
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd)
logs=$(mktemp -d)
export OMP_NUM_THREADS=1 # as CTest runs them
(while true; do
  ninja -C "$load_build" -t clean >/dev/null
  ninja -C "$load_build" >/dev/null 2>&1
done) &
load=$!
trap 'kill $load 2>/dev/null; pkill -f "ninja -C $load_build"' EXIT
failed=0
for round in $(seq 1 "$rounds"); do
  start=$SECONDS
  pids=() names=()
  for build in "$@"; do
    name=$(basename "$build")
    "$build/tests/styleinject_tests" "[distributed]" >"$logs/$name-unit.log" 2>&1 &
    pids+=($!) names+=("$name [distributed]")
    torchrun=()
    if grep -q c10_cuda "$build/CMakeCache.txt" 2>/dev/null && [ -n "${TORCHRUN:-}" ]; then
      torchrun=("$TORCHRUN")
    fi
    python3 "$repo/tests/distributed/data_parallel.py" "$build/examples/typeface" \
      "$logs/$name-work" "${torchrun[@]}" >"$logs/$name-dp.log" 2>&1 &
    pids+=($!) names+=("$name data_parallel")
  done
  results=()
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    results+=("${names[$i]} $rc")
    [ $rc -eq 0 ] || failed=1
  done
  echo "round $round: $(IFS=,; echo "${results[*]}"), $((SECONDS - start)) s," \
    "load $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ $failed -ne 0 ]; then
    echo "logs of the failing round: $logs"
    exit 1
  fi
done
rm -rf "$logs"
