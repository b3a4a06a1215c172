#!/bin/sh
# expect_error.sh PATTERN COMMAND...: passes when COMMAND exits non-zero and
# its output contains PATTERN (a fixed string).
pattern=$1
shift
output=$("$@" 2>&1)
status=$?
printf '%s\n' "$output"
if [ "$status" -eq 0 ]; then
  echo "FAIL: expected a non-zero exit, got 0" >&2
  exit 1
fi
if ! printf '%s' "$output" | grep -qF -- "$pattern"; then
  echo "FAIL: expected the output to contain: $pattern" >&2
  exit 1
fi
