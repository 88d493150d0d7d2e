"""Attention over many tokens: cuDNN's fused kernel against the XLA path, in one process on one GPU.

The XLA path (`llama.attend`) writes the [heads, T, S] scores and probabilities to memory and
reads them back; cuDNN's fused kernel (`llama.flash_attend`, ``HARLI_ATTENTION=cudnn``) keeps
them on chip. Two kinds of rows:

- ``prefill``: a chunk attends to its row's cached pages and to itself. Each case times the
  model's forward step (the engine's program body: RoPE, the cache write, every layer, the LM
head on the last token, sampling) traced once per path, with a random bf16 model of the shape
  and a cache of random contents: fresh prompts (1 x 2048, 8 x 512) and chunks after a cached
  prefix (one 512-token chunk after 1,536 cached tokens, four after 512: the chunked prefill the
  engine runs).
- ``train``: tokens/s of whole LoRA train steps (`bench/train.py`'s `ours_tok_s`: r=16 on all
  seven linear layers, AdamW) at 4 x 512 and 16 x 512, one example per row.

`bench/check_gpu.py` (part 5) checks that the two paths agree.

    python3 bench/attention.py --out bench/results      # writes attention-<device>.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import device_name, write_result  # noqa: E402
from bench.decode_bench import (  # noqa: E402
    PAGE_SIZE,
    VARIANT,
    _engine,
    _median,
    _step_args,
    load_model,
)
from bench.train import ours_tok_s  # noqa: E402
from harli_jax.engine.steps import make_forward_step  # noqa: E402
from harli_jax.memory.kv_cache import KVCache  # noqa: E402

PATHS = ("xla", "cudnn")
# (batch, cached prefix tokens, chunk tokens)
PREFILL_CASES = [(1, 0, 2048), (8, 0, 512), (1, 1536, 512), (4, 512, 512)]
TRAIN_POINTS = [(4, 512), (16, 512)]  # (rows, tokens a row)
SAMPLES, CHAIN = 7, 5


@contextlib.contextmanager
def attention(path: str) -> Iterator[None]:
    """Traces attention over many tokens through ``path`` (read when a program is traced)."""
    before = os.environ.get("HARLI_ATTENTION")
    os.environ["HARLI_ATTENTION"] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ["HARLI_ATTENTION"]
        else:
            os.environ["HARLI_ATTENTION"] = before


def _chunk_inputs(batch: int, prefix: int, chunk: int, vocab: int) -> tuple:
    """Host inputs of a chunk of ``chunk`` tokens per row after ``prefix`` cached ones: each row
    owns consecutive pages after the scratch page."""
    rng = np.random.default_rng(prefix + chunk)
    per_row = (prefix + chunk) // PAGE_SIZE
    table = np.arange(1, 1 + batch * per_row, dtype=np.int32).reshape(batch, per_row)
    positions = np.broadcast_to(np.arange(prefix, prefix + chunk, dtype=np.int32), (batch, chunk))
    slots = np.take_along_axis(table, positions // PAGE_SIZE, axis=1) * PAGE_SIZE
    tokens = rng.integers(0, vocab, (batch, chunk)).astype(np.int32)
    last = np.full(batch, chunk - 1, np.int32)
    return tokens, positions, slots + positions % PAGE_SIZE, table, last


def _time(step, state, cache: KVCache, args: tuple) -> tuple[KVCache, float]:
    """(cache, median ms a step) over chained calls of ``step`` (the cache donated)."""
    for _ in range(2):
        cache, out = step(state, cache, *args, variant=VARIANT)
    jax.block_until_ready((cache, out))
    samples = []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        for _ in range(CHAIN):
            cache, out = step(state, cache, *args, variant=VARIANT)
        jax.block_until_ready((cache, out))
        samples.append((time.perf_counter() - start) / CHAIN * 1e3)
    return cache, _median(samples)


def prefill_row(model, batch: int, prefix: int, chunk: int) -> dict:
    engine = _engine(model, batch, prefix + chunk)
    args, _ = _step_args(_chunk_inputs(batch, prefix, chunk, engine.model_config.vocab_size))
    graphdef, state = engine.graphdef, engine.state
    row: dict = dict(kind="prefill", batch=batch, prefix=prefix, chunk=chunk)
    for path in PATHS:
        with attention(path):
            step = make_forward_step(graphdef)
            engine.cache, ms = _time(step, state, engine.cache, args)
        row[f"{path}_ms"] = ms
        row[f"{path}_tok_s"] = batch * chunk / ms * 1e3
    row["xla_over_cudnn"] = row["xla_ms"] / row["cudnn_ms"]
    return row


def train_row(model, point: tuple[int, int]) -> dict:
    rows, seq_len = point
    row: dict = dict(kind="train", batch=rows, prefix=0, chunk=seq_len)
    for path in PATHS:
        with attention(path):
            tok_s = ours_tok_s(model, point, steps=8, warmup=2)
        row[f"{path}_tok_s"] = tok_s
        row[f"{path}_ms"] = None if tok_s is None else rows * seq_len / tok_s * 1e3
    both = row["xla_ms"] is not None and row["cudnn_ms"] is not None
    row["xla_over_cudnn"] = row["xla_ms"] / row["cudnn_ms"] if both else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tinyllama-1.1b")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    model, _ = load_model(args.shape, None)
    rows = []
    for batch, prefix, chunk in PREFILL_CASES:
        try:
            rows.append(dict(model=args.shape, **prefill_row(model, batch, prefix, chunk)))
        except Exception as err:  # reported; the other cases still count
            print(f"{batch}x{chunk} after {prefix}: {type(err).__name__}: {str(err)[:300]}")
    for point in TRAIN_POINTS:
        try:
            rows.append(dict(model=args.shape, **train_row(model, point)))
        except Exception as err:
            print(f"train {point}: {type(err).__name__}: {str(err)[:300]}")
    command = "python3 " + shlex.join(["bench/attention.py", *sys.argv[1:]])
    write_result(args.out / f"attention-{device_name()}.json", rows, command)


if __name__ == "__main__":
    main()
