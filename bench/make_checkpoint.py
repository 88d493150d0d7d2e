"""Random-weight HF Llama checkpoints for benchmarks: `config.json` plus sharded safetensors.

Benchmarks measure speed, not quality, so a checkpoint of the right shape and layout is all they
need, and it is made on the machine in seconds instead of downloaded. The layout is the one
`transformers` `save_pretrained` writes (`model-0000k-of-0000n.safetensors` and
`model.safetensors.index.json`, HF tensor names), so `LlamaForCausalLM.from_pretrained` and our own
loader read it like a Hub checkpoint.

Weights are drawn tensor by tensor, directly in the target dtype (on the GPU when there is one:
drawing 8B values on the CPU took minutes), and written one shard at a time: peak host memory is
about one shard, even for an 8B model.

    python3 bench/make_checkpoint.py --shape llama3-8b --out /tmp/llama3-8b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from bench.common import SHAPES  # noqa: E402

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_INIT_STD = 0.02  # LlamaConfig.initializer_range


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """HF `LlamaForCausalLM` state-dict names and shapes, in the order they are written."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim", hidden // shape["num_attention_heads"])
    q_width = shape["num_attention_heads"] * head_dim
    kv_width = shape["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (shape["vocab_size"], hidden)
    }
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_width, hidden),
            p + "self_attn.k_proj.weight": (kv_width, hidden),
            p + "self_attn.v_proj.weight": (kv_width, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_width),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not shape.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (shape["vocab_size"], hidden)
    return shapes


def _plan_shards(
    shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int
) -> list[list[str]]:
    """Greedy split of tensors, in order, into shards of at most `shard_bytes` (or one tensor)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, dims in shapes.items():
        size = itemsize * torch.Size(dims).numel()
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def save_random_checkpoint(
    out_dir: str | Path,
    shape_name: str,
    dtype: str = "bfloat16",
    seed: int = 0,
    shard_bytes: int = 3 * 2**30,
) -> Path:
    """Write a random-weight HF Llama checkpoint of `SHAPES[shape_name]` to `out_dir`; return it.

    Linear and embedding weights are N(0, 0.02^2), RMSNorm weights are ones (as a fresh HF model
    initialises them), so activations keep a realistic scale through the layers.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[shape_name]
    torch_dtype = _DTYPES[dtype]

    config = LlamaConfig(**shape, dtype=dtype).to_dict()
    # Hub checkpoints (and readers written against them) use "torch_dtype"; transformers 5 "dtype".
    config |= {"architectures": ["LlamaForCausalLM"], "torch_dtype": dtype}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    shapes = tensor_shapes(shape)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = _plan_shards(shapes, itemsize, shard_bytes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(seed)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch_dtype)
            else:
                t = torch.randn(shapes[name], dtype=torch_dtype, generator=generator, device=device)
                tensors[name] = t.mul_(_INIT_STD).cpu()
            weight_map[name] = filename
        save_file(tensors, out / filename, metadata={"format": "pt"})
    torch.cuda.empty_cache()  # hand the GPU back to whoever loads the checkpoint next
    index = {
        "metadata": {"total_size": itemsize * sum(torch.Size(d).numel() for d in shapes.values())},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=3.0, help="shard size limit, GiB")
    args = parser.parse_args(argv)
    out = save_random_checkpoint(
        args.out, args.shape, args.dtype, args.seed, shard_bytes=int(args.shard_gb * 2**30)
    )
    print(f"wrote {args.shape} ({args.dtype}) to {out}")


if __name__ == "__main__":
    main()
