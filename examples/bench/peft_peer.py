"""PEFT's LoRA on the shapes of a styleinject_bench run, timed the same way.

    python3 peft_peer.py BENCH.json [--json PATH] [--rounds N] [--autocast]

Reads the layer cases of a styleinject_bench JSON file (its device, dtype,
adapter dtype and rounds) and times, per case, the base layer alone and the
same layer with PEFT's LoRA of the bench's "lora" rank (about StyleInject's
parameters), interleaved one call each per round, with a device
synchronisation around each call as the bench does. Ratios are medians of
per-round ratios to the base layer, with their interquartile range, so that
they compare with the bench's "fwd / base" and "train / base" columns:
Python's call overhead is in both of a ratio's terms here, and in neither
of the bench's. With --autocast, every call runs under bfloat16 autocast, as
diffusers' training scripts run PEFT (base weights in the bench's dtype,
LoRA's in its adapter dtype, the matmuls in bfloat16).
"""

import argparse
import contextlib
import json
import statistics
import time

import peft
import torch
from peft import LoraConfig, inject_adapter_in_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def layer_of(row):
    """The layer a bench row timed, from its fields: whether it is a 3x3
    convolution, the input's shape, the channels in and out."""
    if "layer" not in row:
        raise SystemExit(
            f"peft_peer: expected a row with the layer's fields ('layer', "
            f"'lora_rank'), as styleinject_bench writes them since 0.9, but "
            f"row '{row['name']}' has only {sorted(row)}; run the bench again")
    layer = row["layer"]
    return dict(conv=layer["conv"], input=tuple(layer["input"]),
                cin=layer["in"], cout=layer["out"])


class Holder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def build(shape, rank, device, dtype, adapter_dtype):
    torch.manual_seed(0)
    layer = (torch.nn.Conv2d(shape["cin"], shape["cout"], 3, padding=1)
             if shape["conv"] else torch.nn.Linear(shape["cin"], shape["cout"]))
    model = Holder(layer).to(device, dtype).requires_grad_(False)
    if rank == 0:
        return model, []
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"])
    model = inject_adapter_in_model(config, model)
    adapter = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in adapter:
            # What PeftModel's autocast_adapter_dtype does for a bfloat16 base.
            p.data = p.data.to(adapter_dtype).normal_(0.0, 0.02)
            p.requires_grad_(True)
    return model, adapter


def timed_ms(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def quartiles(values):
    if len(values) == 1:  # --rounds 1: no spread to tell
        return dict(median=values[0], q1=values[0], q3=values[0])
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return dict(median=median, q1=q1, q3=q3)


def measure(shape, rank, device, dtype, adapter_dtype, rounds, autocast):
    models = [build(shape, r, device, dtype, adapter_dtype) for r in (0, rank)]
    x = torch.randn(shape["input"], device=device, dtype=dtype)
    x_train = x.clone().requires_grad_(True)
    grad_out = None
    times = [dict(forward=[], train=[]) for _ in models]
    for step in range(rounds + 1):  # step 0 warms up
        for (model, adapter), record in zip(models, times):
            def forward():
                with torch.no_grad(), autocast():
                    model(x)

            def train():
                nonlocal grad_out
                with autocast():
                    out = model(x_train)
                if grad_out is None:
                    grad_out = torch.randn_like(out)
                out.backward(grad_out)
                x_train.grad = None
                for p in adapter:
                    p.grad = None

            forward_ms, train_ms = timed_ms(forward, device), timed_ms(train, device)
            if step > 0:
                record["forward"].append(forward_ms)
                record["train"].append(train_ms)
    base, lora = times
    return {
        "rank": rank,
        "forward_ms": statistics.median(lora["forward"]),
        "train_ms": statistics.median(lora["train"]),
        "base_forward_ms": statistics.median(base["forward"]),
        "base_train_ms": statistics.median(base["train"]),
        "forward_vs_base": quartiles([a / b for a, b in zip(lora["forward"], base["forward"])]),
        "train_vs_base": quartiles([a / b for a, b in zip(lora["train"], base["train"])]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--rounds", type=int, help="default: the bench's")
    parser.add_argument("--autocast", action="store_true",
                        help="run PEFT under bfloat16 autocast, as diffusers trains")
    args = parser.parse_args()
    bench = json.load(open(args.bench_json))
    device = torch.device(bench["device"])
    dtype = DTYPES[bench["dtype"]]
    adapter_dtype = torch.float32 if bench.get("adapter_dtype") == "float32" else dtype
    rounds = args.rounds or bench["rounds"]
    def autocast():
        if not args.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)
    title = (f"PEFT {peft.__version__} LoRA, torch {torch.__version__}, {bench['device']} "
             f"{bench['dtype']} (adapters {adapter_dtype}".replace("torch.", "")
             + f"){', bfloat16 autocast' if args.autocast else ''}, {rounds} rounds, "
             "interleaved with the base layer")
    print(title)
    print(f"\n{'case':<22} {'shape':<28} {'rank':>5} {'fwd ms':>8} {'train ms':>9} "
          f"{'fwd / base':>18} {'train / base':>18}")
    cases = []
    for row in bench["layers"]:
        if row["method"] != "lora":
            continue
        shape = layer_of(row)
        rank = row["lora_rank"]
        result = measure(shape, rank, device, dtype, adapter_dtype, rounds, autocast)
        case = row["name"].rsplit("/", 1)[0]
        cases.append(dict(name=case, shape=row["shape"], **result))
        f, t = result["forward_vs_base"], result["train_vs_base"]
        print(f"{case:<22} {row['shape']:<28} {rank:>5} {result['forward_ms']:>8.3f} "
              f"{result['train_ms']:>9.3f} {f['median']:>6.3f} ({f['q1']:.2f}-{f['q3']:.2f}) "
              f"{t['median']:>6.3f} ({t['q1']:.2f}-{t['q3']:.2f})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(title=title, bench=args.bench_json, autocast=args.autocast,
                           layers=cases), out, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
