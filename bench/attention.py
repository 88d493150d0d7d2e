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
import functools
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import device_name, write_result  # noqa: E402
from bench.decode_bench import (  # noqa: E402
    VARIANT,
    _engine,
    _step_args,
    _time_chained,
    chunk_inputs,
    environ,
    load_model,
)
from bench.train import ours_tok_s  # noqa: E402
from harli_jax.engine.steps import make_forward_step  # noqa: E402

PATHS = ("xla", "cudnn")
# (batch, cached prefix tokens, chunk tokens)
PREFILL_CASES = [(1, 0, 2048), (8, 0, 512), (1, 1536, 512), (4, 512, 512)]
TRAIN_POINTS = [(4, 512), (16, 512)]  # (rows, tokens a row)


def prefill_row(model, batch: int, prefix: int, chunk: int) -> dict:
    engine = _engine(model, batch, prefix + chunk)
    rng = np.random.default_rng(prefix + chunk)
    vocab = engine.model_config.vocab_size
    args, _ = _step_args(chunk_inputs(batch, prefix, chunk, vocab, rng))
    row: dict = dict(kind="prefill", batch=batch, prefix=prefix, chunk=chunk)
    for path in PATHS:
        with environ("HARLI_ATTENTION", path):
            step = functools.partial(
                make_forward_step(engine.graphdef), engine.state, variant=VARIANT
            )
            engine.cache, timing = _time_chained(step, engine.cache, args)
        ms = row[f"{path}_ms"] = timing["ours_ms"]
        row[f"{path}_tok_s"] = batch * chunk / ms * 1e3
    row["xla_over_cudnn"] = row["xla_ms"] / row["cudnn_ms"]
    return row


def train_row(model, point: tuple[int, int]) -> dict:
    rows, seq_len = point
    row: dict = dict(kind="train", batch=rows, prefix=0, chunk=seq_len)
    for path in PATHS:
        with environ("HARLI_ATTENTION", path):
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
