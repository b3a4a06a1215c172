"""Adapter files between StyleInject and Python's safetensors package.

Run by CTest as: python interop.py STYLEINJECT_TESTS WORK_DIR

1. The library saves the adapters of a small model (the hidden Catch test
   [interop-write]); Python opens the file with safetensors and checks every
   tensor's name, shape, dtype and values, and the metadata.
2. Python writes an adapter file with safetensors; the library loads it into a
   fresh model (the hidden Catch test [interop-read]) and checks the values.
3. Python writes a tensor of every dtype the library reads; the library's
   load_safetensors checks them, and its save_safetensors writes its own for
   Python to check (the hidden Catch test [interop-dtypes]).
4. huggingface_hub writes a sharded checkpoint (shards and their index, as
   diffusers' and transformers' save_pretrained do); the library's
   load_weights reads it through the index (the hidden Catch test
   [interop-shards]).

Both sides fill tensor i of a name with the same formula, written separately
in Python (here) and in C++ (test_serialize.cpp), exact in float16.
"""

import json
import os
import subprocess
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

# SPEC §5 shapes of the two adapted layers of the test model (n = 3, r = 2):
# attn.to_v is a Linear 6 -> 4, blocks.0.body.0 a 3x3 Conv2d 4 -> 4.
SHAPES = {
    "attn.to_v.lora_A": (3, 2, 6),
    "attn.to_v.lora_B": (4, 2),
    "attn.to_v.gate": (3, 4),
    "attn.to_v.router.weight": (3, 6),
    "attn.to_v.router.bias": (3,),
    "blocks.0.body.0.lora_A": (3, 2, 4, 3, 3),
    "blocks.0.body.0.lora_B": (4, 2, 1, 1),
    "blocks.0.body.0.gate": (3, 4),
    "blocks.0.body.0.router.weight": (3, 4),
    "blocks.0.body.0.router.bias": (3,),
}
OPTIONS = {
    "rank": 2, "branches": 3, "alpha": None, "dropout": 0.0, "rslora": False,
    "temperature": 1.0, "router": True, "gate": True, "dtype": None,
}


def values(name, shape, period, offset):
    """((i mod period) - period // 2) / 4 + offset(name): exact in float16."""
    count = int(np.prod(shape))
    base = (np.arange(count) % period - period // 2) / 4.0
    return (base + len(name) % 5 * offset).reshape(shape)


# The tensor of each dtype (test_serialize.cpp writes the same formula).
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}


def dtype_values(name):
    i = np.arange(15).reshape(3, 5)
    if name == "BOOL":
        value = i % 3 == 0
    elif name == "U8":
        value = i * 17
    elif name.startswith("I"):
        value = i * 9 - 60
    else:
        value = (i - 7) / 4.0
    return value.astype(DTYPES[name])


def run(exe, tag, folder):
    env = dict(os.environ, STYLEINJECT_INTEROP_DIR=folder)
    done = subprocess.run([exe, tag], env=env)
    if done.returncode != 0:
        sys.exit(f"{exe} {tag} failed with exit code {done.returncode}")


def main():
    exe, folder = sys.argv[1], sys.argv[2]
    os.makedirs(folder, exist_ok=True)

    # 1. C++ writes, Python reads.
    run(exe, "[interop-write]", folder)
    path = os.path.join(folder, "from_cpp.safetensors")
    with safe_open(path, framework="numpy") as f:
        assert sorted(f.keys()) == sorted(SHAPES), f.keys()
        for name, shape in SHAPES.items():
            tensor = f.get_tensor(name)
            assert tensor.dtype == np.float32, (name, tensor.dtype)
            assert tensor.shape == shape, (name, tensor.shape, shape)
            expected = values(name, shape, 17, 1.0)
            assert np.array_equal(tensor, expected), name
        metadata = f.metadata()
    assert metadata["format"] == "styleinject", metadata
    assert metadata["styleinject.version"].count(".") == 2, metadata
    layers = json.loads(metadata["styleinject.layers"])
    assert layers == {
        "blocks.0.body.0": {"type": "Conv2d", **OPTIONS},
        "attn.to_v": {"type": "Linear", **OPTIONS},
    }, layers
    print(f"python read {len(SHAPES)} tensors written by the library")

    # 2. Python writes (float16 and float32), C++ reads.
    tensors = {
        name: values(name, shape, 13, -0.5).astype(
            np.float16 if "lora_A" in name else np.float32)
        for name, shape in SHAPES.items()
    }
    save_file(
        tensors,
        os.path.join(folder, "from_python.safetensors"),
        metadata={"styleinject.layers": json.dumps(layers)},
    )
    run(exe, "[interop-read]", folder)
    print("the library loaded the file written by python")

    # 3. Every dtype, both ways, through the public safetensors API.
    save_file(
        {name: dtype_values(name) for name in DTYPES},
        os.path.join(folder, "dtypes.safetensors"),
        metadata={"who": "python"},
    )
    run(exe, "[interop-dtypes]", folder)
    path = os.path.join(folder, "dtypes_from_cpp.safetensors")
    with safe_open(path, framework="numpy") as f:
        assert sorted(f.keys()) == sorted(DTYPES), f.keys()
        for name in DTYPES:
            tensor, expected = f.get_tensor(name), dtype_values(name)
            assert tensor.dtype == expected.dtype, (name, tensor.dtype)
            assert np.array_equal(tensor, expected), name
        assert f.metadata() == {"who": "cpp"}, f.metadata()
    print(f"{len(DTYPES)} dtypes went both ways")

    # 4. A sharded checkpoint, the weights of test_serialize.cpp's WeightsNet.
    import torch
    from huggingface_hub import save_torch_state_dict

    shapes = {"fc.weight": (2, 3), "fc.bias": (2,), "norm.weight": (2,),
              "norm.bias": (2,), "norm.running_mean": (2,),
              "norm.running_var": (2,)}
    state = {name: torch.from_numpy(values(name, shape, 5, 0.5).astype(np.float32))
             for name, shape in shapes.items()}
    state["norm.num_batches_tracked"] = torch.tensor(7)
    shards = os.path.join(folder, "shards")
    os.makedirs(shards, exist_ok=True)
    save_torch_state_dict(state, shards, max_shard_size=32,
                          filename_pattern="net{suffix}.safetensors")
    with open(os.path.join(shards, "net.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 1, files
    run(exe, "[interop-shards]", folder)
    print(f"the library loaded a checkpoint in {len(files)} shards")


if __name__ == "__main__":
    main()
