"""diffusers + PEFT's side of `styleinject_diffusers bench`: the same model
(a preset of configs/ or a config.json, random weights), the same inputs'
shapes, whole training steps (forward, loss, backward) of the frozen base
and of PEFT's LoRA on to_q, to_k, to_v and to_out.0, interleaved, medians.
Give --rank the LoRA rank that the C++ bench printed (StyleInject's
parameter count). As diffusers' training scripts run it: PEFT keeps the
adapters in float32 on a bfloat16 base, and --autocast computes under
bfloat16 autocast.

usage: peft_steps.py --config sd15 --rank 14 [--batch 4] [--size 64]
           [--tokens 77] [--rounds 5] [--device cuda] [--dtype bfloat16]
           [--autocast]
"""

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model

parser = argparse.ArgumentParser()
parser.add_argument("--config", default="sd15")
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--size", type=int, default=64)
parser.add_argument("--tokens", type=int, default=77)
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--autocast", action="store_true")
args = parser.parse_args()

path = args.config
if not os.path.isfile(path):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", args.config + ".json")
config = json.load(open(path))
device, dtype = torch.device(args.device), getattr(torch, args.dtype)
unet = config["_class_name"] == "UNet2DConditionModel"
cls = UNet2DConditionModel if unet else PixArtTransformer2DModel


def make(lora):
    torch.manual_seed(0)
    model = cls.from_config(config).to(device, dtype).train()
    model.requires_grad_(False)
    if lora:
        inject_adapter_in_model(LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"]), model)
        for name, p in model.named_parameters():  # float32 adapters, as PEFT casts them
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
    return model


models = {"frozen base": make(False), f"PEFT LoRA r={args.rank}": make(True)}
torch.manual_seed(1)
b, s, n = args.batch, args.size, args.tokens
m = models["frozen base"]
inputs = {"timestep": torch.randint(1000, (b,), device=device)}
if unet:
    inputs["sample"] = torch.randn(b, m.config.in_channels, s, s, device=device, dtype=dtype)
    inputs["encoder_hidden_states"] = torch.randn(b, n, m.config.cross_attention_dim, device=device, dtype=dtype)
    if m.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "time_ids": torch.full((b, 6), 8.0 * s, device=device, dtype=dtype),
            "text_embeds": torch.randn(b, m.config.projection_class_embeddings_input_dim
                                       - 6 * m.config.addition_time_embed_dim, device=device, dtype=dtype)}
else:
    inputs["hidden_states"] = torch.randn(b, m.config.in_channels, s, s, device=device, dtype=dtype)
    inputs["encoder_hidden_states"] = torch.randn(b, n, m.config.caption_channels, device=device, dtype=dtype)
    inputs["added_cond_kwargs"] = {"resolution": torch.full((b, 2), 8.0 * s, device=device, dtype=dtype),
                                   "aspect_ratio": torch.ones(b, 1, device=device, dtype=dtype)}


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


times = {name: [] for name in models}
for round in range(args.rounds + 1):  # the first is a warm-up
    for name, model in models.items():
        step = dict(inputs)
        key = "sample" if unet else "hidden_states"
        step[key] = step[key].clone().requires_grad_(name == "frozen base")
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.autocast
                    else contextlib.nullcontext())
        sync()
        start = time.perf_counter()
        with autocast:
            out = model(**step).sample
        out.float().square().mean().backward()
        sync()
        if round > 0:
            times[name].append(1000 * (time.perf_counter() - start))
        model.zero_grad(set_to_none=True)

ratios = [a / f for a, f in zip(times[f"PEFT LoRA r={args.rank}"], times["frozen base"])]
print(f"{args.config}: batch {b}, {s}x{s} latents, {n} tokens, {args.dtype} on {args.device}"
      f"{', bfloat16 autocast' if args.autocast else ''}, torch {torch.__version__}")
for name, values in times.items():
    print(f"  {name:<24} {statistics.median(values):9.1f} ms")
print(f"  PEFT LoRA / frozen base: {statistics.median(ratios):.2f} "
      f"({min(ratios):.2f}-{max(ratios):.2f}) over {args.rounds} interleaved rounds")
