"""LoRA files between StyleInject and the real PEFT and diffusers.

Run by CTest as: python peft_interop.py STYLEINJECT_TESTS WORK_DIR

A model whose three layers have SD UNet names (two Linear, one 3x3 Conv2d) is
built here and, with the same base weights (base.safetensors), in C++ (the
hidden Catch test [interop-peft] in test_lora_files.cpp). Each side computes
its expected values with its own code:

1. PEFT puts a LoRA with per-layer ranks and alphas on the model, saves it
   with save_pretrained, and writes its outputs; C++ imports the directory
   with import_lora and must give the same outputs.
2. C++ exports StyleInject adapters (three branches, one fixed style, gate
   off) with export_lora as a PEFT directory and a kohya file, and writes its
   outputs. PEFT's PeftModel.from_pretrained loads the directory and must give
   the same outputs; diffusers' own kohya conversion must read the kohya file
   into these layer names, and the LoRA formula on its tensors must give the
   same outputs again.
3. PEFT adds a second LoRA, makes both active with weights 0.7 and -0.5 (as
   diffusers' set_adapters does) and writes its outputs; C++ imports the
   second beside the first under its own name, calls set_adapters with the
   same weights, and must give the same outputs.
4. alpha_pattern keys: Python's re.match, as PEFT calls it, on random keys
   and names (patterns.json); C++'s matcher must refuse what Python refuses
   and agree on every match it makes ([interop-patterns]).
"""

import json
import os
import random
import re
import subprocess
import sys
import warnings

import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
)
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

LINEAR_IN = "down_blocks.0.attentions.0.proj_in"
CONV = "down_blocks.0.resnets.0.conv1"
LINEAR_OUT = "mid_block.attentions.0.proj_out"
LAYERS = [LINEAR_IN, CONV, LINEAR_OUT]


def peer_model(weights=None):
    """The three layers under plain modules, named as in C++; with
    `weights`, these are its base weights."""
    root = torch.nn.Module()
    layers = {
        LINEAR_IN: torch.nn.Linear(6, 4),
        CONV: torch.nn.Conv2d(4, 4, 3, padding=1),
        LINEAR_OUT: torch.nn.Linear(4, 5),
    }
    for path, layer in layers.items():
        node = root
        *parents, leaf = path.split(".")
        for key in parents:
            if not hasattr(node, key):
                node.add_module(key, torch.nn.Module())
            node = getattr(node, key)
        node.add_module(leaf, layer)
    if weights is not None:
        root.load_state_dict(weights)
    return root


def outputs(model, inputs):
    with torch.no_grad():
        return {name: model.get_submodule(name)(inputs[name]) for name in LAYERS}


def check_close(what, got, expected):
    for name in LAYERS:
        if not torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-6):
            error = (got[name] - expected[name]).abs().max().item()
            sys.exit(f"{what}: layer {name} differs by up to {error}")
    print(f"{what}: the same outputs on all {len(LAYERS)} layers")


def run(exe, tag, folder):
    env = dict(os.environ, STYLEINJECT_INTEROP_DIR=folder)
    done = subprocess.run([exe, tag], env=env)
    if done.returncode != 0:
        sys.exit(f"{exe} {tag} failed with exit code {done.returncode}")


def lora_formula(base, down, up, alpha, x):
    """W0 x + b0 + (alpha / r) up(down(x)), written out with torch's ops."""
    scale = alpha / down.shape[0]
    if isinstance(base, torch.nn.Conv2d):
        hidden = torch.nn.functional.conv2d(
            x, down, stride=base.stride, padding=base.padding,
            dilation=base.dilation)
        return base(x) + scale * torch.nn.functional.conv2d(hidden, up)
    return base(x) + scale * (x @ down.T @ up.T)


def random_key(rng, depth=0):
    """A random pattern of the regex syntax that PEFT's keys may use, and
    some that this library refuses."""
    atoms = ["a", "b", ".", "\\.", "_", "0", "[ab]", "[^a]", "[a-c]", "[-a]",
             "[a-]", "[\\d_]", "\\d", "\\w", "\\s", "\\W", "\\D", "{", "{x}",
             "{}", "\\n", "\\b", "(?=a)", "\\1"]
    repeats = ["", "", "", "*", "+", "?", "*?", "+?", "{2}", "{1,3}", "{,2}",
               "{2,}", "**", "*+"]
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(atoms) + rng.choice(repeats)
    choice = rng.random()
    if choice < 0.3:
        group = "(?:" if rng.random() < 0.3 else "("
        return group + random_key(rng, depth + 1) + ")" + rng.choice(repeats)
    if choice < 0.5:
        return random_key(rng, depth + 1) + "|" + random_key(rng, depth + 1)
    if choice < 0.6:
        return rng.choice(["^", ""]) + random_key(rng, depth + 1) + "$"
    return random_key(rng, depth + 1) + random_key(rng, depth + 1)


def write_patterns(path, count=20000):
    """Python's verdict on random keys against random names, as PEFT's
    get_pattern_key matches them: "match", "no", or "error" where re
    refuses the pattern."""
    rng = random.Random(7)
    cases = []
    for _ in range(count):
        if rng.random() < 0.2:  # a plain name, as PEFT and diffusers write
            key = rng.choice(["", "^"]) + "".join(
                rng.choice(["a", "b", "_", "0", ".", "\\."])
                for _ in range(rng.randint(1, 5)))
        elif rng.random() < 0.25:  # any string of regex characters
            key = "".join(rng.choice("ab.()[]{}*+?|^$\\-,0123dws")
                          for _ in range(rng.randint(1, 8)))
        else:
            key = random_key(rng)
        pattern = rf"(.*\.)?({key})$"
        name = "".join(rng.choice("ab._01 {}-") for _ in range(rng.randint(0, 8)))
        if key.strip("^ab_0.\\") == "" and rng.random() < 0.5:
            # The module the plain key names, its '.'s as any character.
            name = rng.choice(["", "x.", "ab_", "a.b."]) + "".join(
                rng.choice("._a") if c == "." else c
                for c in key.lstrip("^").replace("\\.", "\0")).replace("\0", ".")
        name += rng.choice(["", "", "", "\n", "\u00e9"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                verdict = "match" if re.match(pattern, name) else "no"
        except re.error:
            verdict = "error"
        cases.append([key, name, verdict])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cases, f)


def main():
    exe, folder = sys.argv[1], sys.argv[2]
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(90)
    base = peer_model()
    save_file(base.state_dict(), f"{folder}/base.safetensors")
    inputs = {
        LINEAR_IN: torch.randn(2, 3, 6),
        CONV: torch.randn(2, 4, 5, 5),
        LINEAR_OUT: torch.randn(2, 3, 4),
    }
    save_file(inputs, f"{folder}/inputs.safetensors")

    # 1. PEFT's LoRA, ranks and alphas per layer (one by a regex key), into
    # C++.
    config = LoraConfig(
        r=2, lora_alpha=3, target_modules=LAYERS,
        rank_pattern={CONV: 3},
        alpha_pattern={r"mid_block\.attentions\.\d+\.proj_\w+": 5})
    peft_model = get_peft_model(peer_model(base.state_dict()), config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.5)
    save_file(
        outputs(peft_model.base_model.model, inputs),
        f"{folder}/peft_outputs.safetensors")

    # 3. A second PEFT adapter beside it, both active with their own
    # weights as diffusers' set_adapters makes them; C++ imports both and
    # sums them with set_adapters.
    peft_model.add_adapter("second", LoraConfig(
        r=3, lora_alpha=2, target_modules=LAYERS, rank_pattern={LINEAR_IN: 1}))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".second." in name:
                parameter.copy_(torch.randn_like(parameter) * 0.5)
    peft_model.save_pretrained(f"{folder}/peft_from_python")  # second/ too
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(["default", "second"])
            module.set_scale("default", 0.7)
            module.set_scale("second", -0.5)
    save_file(
        outputs(peft_model.base_model.model, inputs),
        f"{folder}/peft_two_outputs.safetensors")
    run(exe, "[interop-peft]", folder)
    write_patterns(f"{folder}/patterns.json")
    run(exe, "[interop-patterns]", folder)

    # 2. C++'s export, into PEFT and through diffusers' kohya conversion.
    expected = load_file(f"{folder}/cpp_outputs.safetensors")
    loaded = PeftModel.from_pretrained(
        peer_model(base.state_dict()), f"{folder}/peft_from_cpp"
    ).base_model.model
    check_close("PEFT loads export_lora's directory", outputs(loaded, inputs),
                expected)

    kohya = load_file(f"{folder}/kohya_from_cpp.safetensors")
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    got = {}
    with torch.no_grad():
        for name in LAYERS:
            down = converted.pop(f"unet.{name}.lora.down.weight")
            up = converted.pop(f"unet.{name}.lora.up.weight")
            alpha = alphas.pop(f"unet.{name}.alpha")
            got[name] = lora_formula(
                base.get_submodule(name), down, up, alpha, inputs[name])
    if converted or alphas:
        sys.exit(f"diffusers' conversion gave more than the three layers: "
                 f"{sorted(converted) + sorted(alphas)}")
    check_close("diffusers' kohya conversion of export_lora's file", got,
                expected)


if __name__ == "__main__":
    main()
