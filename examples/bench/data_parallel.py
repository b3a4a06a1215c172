#!/usr/bin/env python3
"""data_parallel.py TYPEFACE [ROUNDS] [STEPS]: the typeface example's
fine-tune step on one process and on two (loopback Gloo), interleaved,
ROUNDS times each (default 3) of STEPS steps (default 40), batch 16 on the
shipped small model. Prints each run's seconds per step, bytes communicated
per step and the communication's share of the time (as `finetune` reports
them), then the medians.

Threads: one process gets every core, each of two an equal share
(OMP_NUM_THREADS, as torchrun sets it), so both use the whole machine.
OpenBLAS (Debian's LibTorch) gets one thread per process: its own threads
under LibTorch's oversubscribe the cores (2 + 2 on 2 cores: 0.49 s per
step where one BLAS thread gives 0.21).
"""

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile

typeface = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
steps = sys.argv[3] if len(sys.argv) > 3 else "40"
cores = os.cpu_count()


def run(processes, out):
    threads = str(max(1, cores // processes))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ranks = []
    for rank in range(processes):
        env = dict(os.environ, OMP_NUM_THREADS=threads,
                   OPENBLAS_NUM_THREADS="1")
        if processes > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(processes),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        ranks.append(subprocess.Popen(
            [typeface, "finetune", "--steps", steps, "--batch", "16",
             "--checkpoint-every", "100000", "--out", out],
            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            text=True))
    errors = [r.communicate()[1] for r in ranks]
    if any(r.returncode for r in ranks):
        sys.exit("finetune failed:\n" + "\n".join(errors))
    line = re.search(r"finetune: ([0-9.e+-]+) s per step(.*)", errors[0])
    seconds = float(line.group(1))
    shared = re.search(r"over \d+ processes: ([0-9.e+-]+) bytes "
                       r"communicated per step, in ([0-9.e+-]+) %",
                       line.group(2))
    return (seconds, float(shared.group(1)) if shared else 0.0,
            float(shared.group(2)) if shared else 0.0)


results = {1: [], 2: []}
with tempfile.TemporaryDirectory() as work:
    for r in range(rounds):
        for processes in (1, 2):
            result = run(processes, os.path.join(work, "p%d" % processes))
            results[processes].append(result)
            print("round %d, %d process(es): %.4f s per step, %.0f bytes per "
                  "step, communication %.1f %% of the time" %
                  ((r + 1, processes) + result), flush=True)
print("%d cores; medians of %d rounds of %s steps:" % (cores, rounds, steps))
one = statistics.median(s for s, _, _ in results[1])
two = statistics.median(s for s, _, _ in results[2])
ratios = sorted(b[0] / a[0] for a, b in zip(results[1], results[2]))
print("  1 process:   %.4f s per step" % one)
print("  2 processes: %.4f s per step (x%.2f of 1 process; per round "
      "%s), %.0f bytes per step, communication %.1f %% of the time" %
      (two, two / one, ", ".join("%.2f" % x for x in ratios),
       statistics.median(b for _, b, _ in results[2]),
       statistics.median(c for _, _, c in results[2])))
