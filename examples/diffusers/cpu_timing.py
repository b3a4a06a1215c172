"""Load and forward times of an SD-1.5-sized UNet (random weights): this
port (styleinject_diffusers forward) against diffusers in Python, on the
same machine and threads, interleaved, medians over rounds.

usage: cpu_timing.py STYLEINJECT_DIFFUSERS WORKDIR [--rounds 3] [--threads 2]
"""

import argparse
import os
import re
import statistics
import subprocess
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

parser = argparse.ArgumentParser()
parser.add_argument("exe")
parser.add_argument("work")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)
model_dir = os.path.join(args.work, "sd15")
inputs_path = os.path.join(args.work, "inputs.safetensors")
if not os.path.exists(os.path.join(model_dir, "config.json")):
    torch.manual_seed(0)
    UNet2DConditionModel(  # SD-1.5's config
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    ).save_pretrained(model_dir)
torch.manual_seed(1)
inputs = {"sample": torch.randn(1, 4, 64, 64), "timestep": torch.tensor([500]),
          "encoder_hidden_states": torch.randn(1, 77, 768)}
save_file(inputs, inputs_path)

times = {"diffusers load": [], "diffusers 1st forward": [], "diffusers forward": [],
         "C++ load": [], "C++ 1st forward": [], "C++ forward": []}
for round in range(args.rounds):
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(model_dir).eval()
    times["diffusers load"].append(time.perf_counter() - start)
    with torch.no_grad():
        start = time.perf_counter()
        unet(**inputs)  # the first reads the mapped weights' pages
        times["diffusers 1st forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        expected = unet(**inputs).sample
        times["diffusers forward"].append(time.perf_counter() - start)
    del unet
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(
        [args.exe, "forward", "--model", model_dir, "--inputs", inputs_path, "--repeat", "2",
         "--out", os.path.join(args.work, "out.safetensors")],
        capture_output=True, text=True, check=True, env=env).stdout
    times["C++ load"].append(float(re.search(r"loaded in ([0-9.]+) s", out).group(1)))
    forwards = [float(t) for t in re.findall(r"forward in ([0-9.]+) s", out)]
    times["C++ 1st forward"].append(forwards[0])
    times["C++ forward"].append(forwards[-1])
    print(f"round {round}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)

print(f"SD-1.5 UNet, float32, batch 1, 64x64 latents, 77 tokens, {args.threads} threads, "
      f"torch {torch.__version__}, {args.rounds} rounds (medians; range):")
for key, values in times.items():
    print(f"  {key:<18} {statistics.median(values):7.2f} s  ({min(values):.2f}-{max(values):.2f})")
for what in ("load", "1st forward", "forward"):  # medians of per-round ratios
    ratios = [c / d for c, d in zip(times["C++ " + what], times["diffusers " + what])]
    print(f"  C++ / diffusers, {what:<12} {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
