"""Handing an adapter to serving: how long the engine loop is held, against per-layer writes.

A finished fine-tune job's adapter (or one a user loads) goes into a slot of the serving bank
on the engine loop, between steps, while requests wait. `EngineCore.load_adapter` writes every
layer's slot in one program, compiled at start-up (`EngineCore.compile_all`). The baseline, in
this script, is how it was written before: each layer's A, B and scaling on their own eager
device operations (padding to the bank's rank on the device too), which compile on first use
for every new shape. Each loads three adapters in turn, timed to the bank's arrays being ready:
q,v at rank 16 (the first load), the same again (a replacement), then every linear module at
rank 8 (a new rank and new shapes). The baseline runs first, in the same process, on its own
engine.

    python3 bench/adapter_load.py                             # TinyLlama-1.1B shape (GPU)
    python3 bench/adapter_load.py --shapes tiny --out /tmp/r  # CPU smoke run
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import common  # noqa: I001  (sets the allocator before jax is imported)
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train import ensure_checkpoint  # noqa: E402
from harli_jax import LLM  # noqa: E402
from harli_jax.lora.config import ALL_LINEAR, LoraConfig  # noqa: E402
from harli_jax.lora.inject import lora_layers  # noqa: E402

LOADS = (  # (what the load is, rank, target modules)
    ("first", 16, ("q_proj", "v_proj")),
    ("replacement", 16, ("q_proj", "v_proj")),
    ("new rank and modules", 8, ALL_LINEAR),
)


def eager_load(llm: LLM, name: str, weights: dict, config: LoraConfig) -> None:
    """The baseline: each layer's slot written by its own eager operations."""
    core = llm.engine
    model = nnx.merge(core.graphdef, core.state)
    slot = core.adapters._slots.setdefault(name, len(core.adapters._slots) + 1)
    for path, layer in lora_layers(model).items():
        a, b, scale = 0, 0, 0.0  # a layer the adapter does not cover: its slot zeroed
        if path in weights:
            rank = layer.lora_a.shape[-1]
            a, b = (jnp.asarray(w) for w in weights[path])
            a = jnp.pad(a, ((0, 0), (0, rank - a.shape[1]))).astype(layer.lora_a.dtype)
            b = jnp.pad(b, ((0, rank - b.shape[0]), (0, 0))).astype(layer.lora_b.dtype)
            scale = config.scaling
        layer.lora_a[...] = layer.lora_a[...].at[slot].set(a)
        layer.lora_b[...] = layer.lora_b[...].at[slot].set(b)
        layer.scaling[...] = layer.scaling[...].at[slot].set(scale)
    _, core.state = nnx.split(model)


def random_adapter(llm: LLM, rank: int, targets, rng) -> tuple[dict, LoraConfig]:
    """Random A and B for every bank layer whose module is one of ``targets``."""
    config = LoraConfig(r=rank, alpha=2 * rank, target_modules=targets)
    model = nnx.merge(llm.engine.graphdef, llm.engine.state)
    weights = {}
    for path, layer in lora_layers(model).items():
        if targets == ALL_LINEAR or path.rsplit(".", 1)[-1] in targets:
            fan_in, fan_out = layer.lora_a.shape[1], layer.lora_b.shape[-1]
            weights[path] = (
                rng.normal(0, 0.02, (fan_in, rank)).astype(np.float32),
                rng.normal(0, 0.02, (rank, fan_out)).astype(np.float32),
            )
    return weights, config


def time_loads(llm: LLM, load, method: str, shape: str) -> list[dict]:
    rng, rows = np.random.default_rng(0), []
    for what, rank, targets in LOADS:
        weights, config = random_adapter(llm, rank, targets, rng)
        start = time.perf_counter()
        load(llm, "adapter", weights, config)
        jax.block_until_ready(llm.engine.weights)
        ms = 1e3 * (time.perf_counter() - start)
        rows.append(dict(model=shape, method=method, load=what, rank=rank, ms=ms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tinyllama-1.1b", help="comma-separated SHAPES names")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--ckpt-root", type=Path, default=Path("/tmp/harli-bench-ckpt"))
    args = parser.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        checkpoint = ensure_checkpoint(args.ckpt_root, shape)
        for method, load in (
            ("per-layer eager writes", eager_load),
            ("one program", lambda llm, *adapter: llm.engine.load_adapter(*adapter)),
        ):
            llm = LLM(checkpoint, "bfloat16", max_num_seqs=8, max_model_len=512)
            llm.engine.compile_all()  # start-up: the engine's programs, the bank's write
            rows += time_loads(llm, load, method, shape)
            del llm
    for row in rows:
        if row["method"] == "one program":
            base = next(r for r in rows if r["method"] != row["method"] and r["load"] == row["load"]
                        and r["model"] == row["model"])  # fmt: skip
            row["speedup"] = base["ms"] / row["ms"]
    device = common.device_name()
    command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
    common.write_result(args.out / f"adapter-load-{device}.json", rows, command)


if __name__ == "__main__":
    main()
