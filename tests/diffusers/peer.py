"""styleinject_diffusers against diffusers itself.

diffusers builds small random-weight models of several configs and saves
them with save_pretrained (one of them sharded); the C++ port loads each
directory and must give diffusers' outputs, float32 on the CPU. The same
with LoRAs that diffusers adds through PEFT and saves (its model and
pipeline savers), imported with --lora. Then directories and inputs that
must be refused, each with the message that names the cause.

usage: peer.py STYLEINJECT_DIFFUSERS WORKDIR
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import torch
from diffusers import PixArtTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-4  # max |C++ - diffusers| / max |diffusers|, float32
EXE, WORK = sys.argv[1], sys.argv[2]
failures = []

UNETS = {
    # SD-1.x's layout, small: cross-attention down blocks then a plain one,
    # two ResNets per block, heads from attention_head_dim.
    "sd1": dict(
        block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, sample_size=8),
    # SD-2.x's: linear projections, heads per block, upcast attention; and
    # the other timestep features, a 1-pixel downsample padding.
    "sd2": dict(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=20, attention_head_dim=[2, 4], use_linear_projection=True,
        upcast_attention=True, flip_sin_to_cos=False, freq_shift=1, sample_size=8),
    # SDXL's: text_time conditioning, several transformer layers per block.
    "sdxl": dict(
        block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=[2, 4], use_linear_projection=True,
        transformer_layers_per_block=[1, 2], addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=10 + 6 * 8,
        sample_size=8),
}
PIXARTS = {
    # PixArt-α at 512 px: no size conditions; a caption mask.
    "pixart": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=16, caption_channels=12, sample_size=8,
        patch_size=2),
    # At 1024 px: resolution and aspect ratio; a non-square latent.
    "pixart1024": dict(
        num_attention_heads=3, attention_head_dim=4, in_channels=4, out_channels=4,
        num_layers=1, cross_attention_dim=12, caption_channels=8, sample_size=8,
        patch_size=2, use_additional_conditions=True, interpolation_scale=2),
}


def perturb(model, seed):
    """Every weight random: diffusers starts some at 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def inputs_for(name, model):
    torch.manual_seed(len(name))
    if name in UNETS:
        c = model.config
        size = 10 if name == "sd1" else 8  # 10: odd sizes on the way down
        inputs = {
            "sample": torch.randn(2, c.in_channels, size, size),
            "timestep": torch.tensor([3, 951]),
            "encoder_hidden_states": torch.randn(2, 5, c.cross_attention_dim),
        }
        if c.addition_embed_type == "text_time":
            inputs["text_embeds"] = torch.randn(2, 10)
            inputs["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 4, 2, 32, 48]])
        return inputs
    c = model.config
    height, width = (8, 12) if name == "pixart1024" else (8, 8)
    inputs = {
        "sample": torch.randn(2, c.in_channels, height, width),
        "timestep": torch.tensor([7, 640]),
        "encoder_hidden_states": torch.randn(2, 6, c.caption_channels),
    }
    if name == "pixart":
        inputs["encoder_attention_mask"] = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
    if model.use_additional_conditions:
        inputs["resolution"] = torch.tensor([[64.0, 96], [128, 128]])
        inputs["aspect_ratio"] = torch.tensor([[0.667], [1.0]])
    return inputs


def diffusers_forward(name, model, inputs):
    with torch.no_grad():
        if name in UNETS:
            added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
            return model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                         added_cond_kwargs=added or None).sample
        added = {k: inputs[k] for k in ("resolution", "aspect_ratio") if k in inputs}
        return model(inputs["sample"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     timestep=inputs["timestep"], added_cond_kwargs=added or None,
                     encoder_attention_mask=inputs.get("encoder_attention_mask")).sample


def run(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True)


def compare(label, model_dir, inputs_path, expected, extra=(), base=None):
    out = os.path.join(WORK, label + ".out.safetensors")
    result = run("forward", "--model", model_dir, "--inputs", inputs_path, "--out", out, *extra)
    if result.returncode != 0:
        failures.append(f"{label}: exit {result.returncode}: {result.stderr.strip()}")
        return
    got = load_file(out)["sample"]
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    status = "ok" if got.shape == expected.shape and error <= TOLERANCE else "FAILED"
    print(f"{label:<28} {tuple(expected.shape)}  max rel. error {error:.2e}  {status}")
    if status != "ok":
        failures.append(f"{label}: shape {tuple(got.shape)}, error {error:.2e}")
    if base is not None:  # the LoRA must matter, or the match says nothing
        moved = ((expected - base).abs().max() / expected.abs().max()).item()
        if moved < 100 * TOLERANCE:
            failures.append(f"{label}: the LoRA moves the output by {moved:.1e} only")


def expect_error(label, needle, *args):
    out = os.path.join(WORK, label + ".out.safetensors")
    result = run(*args, "--out", out)
    ok = result.returncode == 1 and needle in result.stderr and not os.path.exists(out)
    print(f"refuses {label:<26} {'ok' if ok else 'FAILED'}")
    if not ok:
        failures.append(f"refusal {label}: exit {result.returncode}, stderr {result.stderr!r}")


def lora_config(*extra_targets):
    """A LoRA as diffusers trains one (PEFT underneath), B random as if
    trained, an alpha_pattern to show that per-module alphas travel too."""
    return LoraConfig(
        r=4, lora_alpha=8, alpha_pattern={"to_k": 2}, init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", *extra_targets])


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    torch.manual_seed(0)
    models, outputs = {}, {}
    for seed, (name, config) in enumerate({**UNETS, **PIXARTS}.items()):
        cls = UNet2DConditionModel if name in UNETS else PixArtTransformer2DModel
        model = perturb(cls(**config), seed)
        model_dir = os.path.join(WORK, name)
        # sd2 in shards of at most 20 kB, with their index.
        model.save_pretrained(model_dir, **({"max_shard_size": "20KB"} if name == "sd2" else {}))
        inputs = inputs_for(name, model)
        inputs_path = os.path.join(WORK, name + ".inputs.safetensors")
        save_file(inputs, inputs_path)
        compare(name, model_dir, inputs_path, diffusers_forward(name, model, inputs))
        models[name] = (model, model_dir, inputs, inputs_path)
        outputs[name] = diffusers_forward(name, model, inputs)
    assert os.path.exists(os.path.join(WORK, "sd2", "diffusion_pytorch_model.safetensors.index.json"))

    # bfloat16 and float16: the port's error against float32 at most twice
    # diffusers' own in that dtype (a ratio: the error depends on the model).
    # LibTorch 1.13 has no float16 CPU kernels: there, the refusal.
    for name, dtype in (("sd1", "bfloat16"), ("pixart", "bfloat16"),
                        ("sd1", "float16"), ("pixart", "float16")):
        model, model_dir, inputs, inputs_path = models[name]
        low_type = getattr(torch, dtype)
        low = {k: v.to(low_type) if v.is_floating_point() else v for k, v in inputs.items()}
        theirs = diffusers_forward(name, copy.deepcopy(model).to(low_type), low).float()
        out = os.path.join(WORK, f"{name}-{dtype}.out.safetensors")
        result = run("forward", "--model", model_dir, "--inputs", inputs_path, "--out", out,
                     "--dtype", dtype)
        if dtype == "float16" and "float16 on the CPU needs LibTorch 2.x" in result.stderr:
            print(f"{name + ' ' + dtype:<28} refused on LibTorch 1.13, as it should be")
            continue
        if result.returncode != 0:
            failures.append(f"{name} {dtype}: {result.stderr.strip()}")
            continue
        ours = load_file(out)["sample"]
        scale = outputs[name].abs().max()
        error, their_error = [((o.float() - outputs[name]).abs().max() / scale).item()
                              for o in (ours, theirs)]
        ok = ours.dtype == low_type and error <= 2 * their_error
        print(f"{name + ' ' + dtype:<28} error {error:.2e}, diffusers' {their_error:.2e}  "
              f"{'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"{name} {dtype}: {ours.dtype}, error {error:.2e} against "
                            f"diffusers' {their_error:.2e}")

    # LoRAs. The UNet: diffusers' add_adapter, saved by the model's saver
    # and by the pipeline's. PixArt, which has no add_adapter: PEFT's own
    # get_peft_model, saved as PEFT's adapter directory.
    torch.manual_seed(7)
    model, model_dir, inputs, inputs_path = models["sd1"]
    model.add_adapter(lora_config("conv1", "conv2"))  # the ResNets' convolutions too
    expected = diffusers_forward("sd1", model, inputs)
    model.save_lora_adapter(os.path.join(WORK, "sd1-lora"))
    compare("sd1 + LoRA (model's saver)", model_dir, inputs_path, expected,
            ("--lora", os.path.join(WORK, "sd1-lora", "pytorch_lora_weights.safetensors")),
            outputs["sd1"])
    StableDiffusionPipeline.save_lora_weights(
        os.path.join(WORK, "sd1-pipeline-lora"), unet_lora_layers=get_peft_model_state_dict(model),
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict())
    compare("sd1 + LoRA (pipeline's)", model_dir, inputs_path, expected,
            ("--lora", os.path.join(WORK, "sd1-pipeline-lora", "pytorch_lora_weights.safetensors")),
            outputs["sd1"])
    # A community SD LoRA's format: diffusers' conversion to kohya's keys
    # ("lora_unet_down_blocks_0_..."), which writes alpha = rank, so the
    # LoRA it converts has lora_alpha = r.
    torch.manual_seed(8)
    kohya_model = copy.deepcopy(models["sd1"][0])
    kohya_model.delete_adapters("default")
    kohya_model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    expected = diffusers_forward("sd1", kohya_model, inputs)
    kohya = convert_state_dict_to_kohya(
        {"unet." + k: v for k, v in get_peft_model_state_dict(kohya_model).items()})
    assert all(k.startswith("lora_unet_") for k in kohya), list(kohya)[:3]
    save_file(kohya, os.path.join(WORK, "sd1-kohya.safetensors"))
    compare("sd1 + LoRA (kohya)", model_dir, inputs_path, expected,
            ("--lora", os.path.join(WORK, "sd1-kohya.safetensors")), outputs["sd1"])

    model, model_dir, inputs, inputs_path = models["pixart"]
    peft_model = get_peft_model(model, lora_config())
    expected = diffusers_forward("pixart", model, inputs)
    peft_model.save_pretrained(os.path.join(WORK, "pixart-lora"))
    compare("pixart + LoRA (PEFT dir)", model_dir, inputs_path, expected,
            ("--lora", os.path.join(WORK, "pixart-lora")), outputs["pixart"])

    # finetune: StyleInject on the denoising loss of a few latents lowers the
    # loss of a fixed batch; forward with its adapters moves the output.
    for name, channels, caption in (("sd1", 4, 12), ("pixart", 4, 12)):
        _, model_dir, _, inputs_path = models[name]
        torch.manual_seed(9)
        data = os.path.join(WORK, name + ".data.safetensors")
        save_file({"sample": torch.randn(4, channels, 8, 8),
                   "encoder_hidden_states": torch.randn(4, 5, caption)}, data)
        adapters = os.path.join(WORK, name + ".adapters.safetensors")
        result = run("finetune", "--model", model_dir, "--data", data, "--out", adapters,
                     "--steps", "40", "--lr", "3e-3", "--batch", "4")
        found = re.search(r"eval loss: ([0-9.]+) -> ([0-9.]+)", result.stdout)
        losses = [float(v) for v in found.groups()] if found else []
        out = os.path.join(WORK, name + ".tuned.out.safetensors")
        tuned = run("forward", "--model", model_dir, "--inputs", inputs_path, "--out", out,
                    "--adapters", adapters)
        moved = (((load_file(out)["sample"] - outputs[name]).abs().max() / outputs[name].abs().max()).item()
                 if tuned.returncode == 0 else 0.0)
        ok = len(losses) == 2 and losses[1] < 0.9 * losses[0] and moved > 100 * TOLERANCE
        print(f"{name + ' finetune':<28} eval loss {losses}, output moved {moved:.1e}  "
              f"{'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"{name} finetune: {result.stderr.strip()} {tuned.stderr.strip()}")

    # Refusals: each directory a copy of sd1's with one thing wrong.
    _, sd1_dir, _, sd1_inputs = models["sd1"]
    weights = load_file(os.path.join(sd1_dir, "diffusion_pytorch_model.safetensors"))
    config = json.load(open(os.path.join(sd1_dir, "config.json")))

    def broken(label, change_weights=None, change_config=None, raw=None):
        path = os.path.join(WORK, "broken-" + label)
        shutil.copytree(sd1_dir, path)
        file = os.path.join(path, "diffusion_pytorch_model.safetensors")
        if change_weights:
            tensors = dict(weights)
            change_weights(tensors)
            save_file(tensors, file)
        if change_config:
            c = dict(config)
            change_config(c)
            json.dump(c, open(os.path.join(path, "config.json"), "w"))
        if raw:
            raw(file)
        return path

    def forward_args(model_dir):
        return ("forward", "--model", model_dir, "--inputs", sd1_inputs)

    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    expect_error("wrong shape", f"tensor '{key}' has shape [8, 12]",
                 *forward_args(broken("shape", lambda t: t.update({key: t[key][:8]}))))
    expect_error("missing key", f"the file lacks 1 ('{key}')",
                 *forward_args(broken("missing", lambda t: t.pop(key))))
    expect_error("unexpected key", "has 1 the module does not ('extra.weight')",
                 *forward_args(broken("unexpected", lambda t: t.update({"extra.weight": torch.ones(1)}))))

    def other_block(c):
        c["down_block_types"] = ["SimpleCrossAttnDownBlock2D"] + c["down_block_types"][1:]

    expect_error("unknown block type",
                 'block type "SimpleCrossAttnDownBlock2D" is not supported by this port',
                 *forward_args(broken("block", change_config=other_block)))
    expect_error("unsupported option",
                 '"resnet_time_scale_shift": "scale_shift" is not supported by this port',
                 *forward_args(broken("option", change_config=lambda c: c.update(
                     resnet_time_scale_shift="scale_shift"))))
    expect_error("unknown class", '"_class_name": expected "UNet2DConditionModel"',
                 *forward_args(broken("class", change_config=lambda c: c.update(
                     _class_name="UNet3DConditionModel"))))

    def truncate(file):
        size = os.path.getsize(file)
        with open(file, "r+b") as f:
            f.truncate(size - 100)

    expect_error("truncated file", "run past the end of the data",
                 *forward_args(broken("truncated", raw=truncate)))
    expect_error("no weights", "expected diffusers' weights",
                 *forward_args(broken("none", raw=os.remove)))
    bad_inputs = os.path.join(WORK, "bad.inputs.safetensors")
    save_file({"sample": torch.zeros(1, 4, 8, 8)}, bad_inputs)
    expect_error("input missing", "expected a tensor 'timestep'",
                 "forward", "--model", sd1_dir, "--inputs", bad_inputs)
    _, xl_dir, xl_inputs, _ = models["sdxl"]
    no_time = os.path.join(WORK, "sdxl-no-time.inputs.safetensors")
    save_file({k: v for k, v in xl_inputs.items() if k not in ("text_embeds", "time_ids")}, no_time)
    expect_error("SDXL without time_ids", 'the inputs need "text_embeds" and "time_ids"',
                 "forward", "--model", xl_dir, "--inputs", no_time)

    if failures:
        print("\n".join(["FAILED:"] + failures))
        sys.exit(1)
    print("all outputs equal diffusers' within", TOLERANCE)


main()
