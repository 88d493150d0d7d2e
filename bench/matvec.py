"""The fused decode projections against XLA's, one layer's shapes at a time, on the GPU.

For each projection of a TinyLlama-1.1B and a Llama-3-8B layer, as the fused decode layer calls
it (RMSNorm + q/k/v, o + residual, RMSNorm + gate/up + SiLU, down + residual), at batch 1 and 4:
the time per call of `fused_matvec` under several launch shapes against the same function through
XLA (`fused_matvec_reference`: XLA's own kernels for the norm, the dots, SiLU and the add), and
the weight bytes over that time. Each timed program applies the call to ``COPIES`` distinct weight
copies in a row (more bytes than the 50 MB L2), each input derived from the last output, so that
weights come from HBM and launches sit back to back as in a decode step.

    python3 bench/matvec.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.check_gpu import MATVEC_CASES  # noqa: E402
from bench.common import device_name, format_table  # noqa: E402
from harli_jax.kernels.matvec import (  # noqa: E402
    DEFAULT_TUNING,
    Norm,
    Tuning,
    fused_matvec,
    fused_matvec_reference,
)

COPIES = 12
TUNINGS = {
    "default": DEFAULT_TUNING,
    "rows4": DEFAULT_TUNING._replace(rows=4),
    "rows16": DEFAULT_TUNING._replace(rows=16),
    "chunk256": DEFAULT_TUNING._replace(chunk=256),
    "chunk1024": DEFAULT_TUNING._replace(chunk=1024),
    "stages2": DEFAULT_TUNING._replace(num_stages=2),
    "stages4": DEFAULT_TUNING._replace(num_stages=4),
}


def _program(fn, kind: str, tuning: Tuning | None):
    """A jitted chain of ``fn`` over the weight copies; the input of each call is the sum of
    the last call's outputs, concatenated and cut or repeated to the input width."""
    kwargs = {} if tuning is None else {"tuning": tuning}

    @jax.jit
    def chain(x, copies, norm_weight, residual):
        for weights in copies:
            outs = fn(
                x,
                weights,
                norm=Norm(norm_weight, 1e-5) if kind in ("norm", "glu") else None,
                residual=residual if kind == "residual" else None,
                glu=kind == "glu",
                **kwargs,
            )
            x = jnp.resize(jnp.concatenate(outs, axis=1), x.shape).astype(x.dtype) * 0.5
        return x

    return chain


def _time_us(program, args: tuple, calls: int = 20, samples: int = 7) -> float:
    """Microseconds per projection: ``calls`` dispatches queued back to back, then one wait."""
    jax.block_until_ready(program(*args))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            out = program(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls / COPIES * 1e6)
    return statistics.median(times)


def _case(name: str, width: int, outputs: tuple[int, ...], kind: str, batch: int) -> dict:
    key = jax.random.key(width + batch)
    keys = jax.random.split(key, 4)
    x = jax.random.normal(keys[0], (batch, width), jnp.bfloat16)
    copies = [
        [
            (jax.random.normal(k, (n, width)) / width**0.5).astype(jnp.bfloat16)
            for k, n in zip(jax.random.split(jax.random.fold_in(keys[1], c), len(outputs)), outputs)
        ]
        for c in range(COPIES)
    ]
    norm_weight = jnp.ones((width,), jnp.bfloat16)
    residual = jax.random.normal(keys[2], (batch, outputs[0]), jnp.bfloat16)
    args = (x, copies, norm_weight, residual)
    weight_bytes = sum(outputs) * width * 2
    row = dict(case=name, batch=batch, weight_mb=round(weight_bytes / 1e6, 2))
    row["xla_us"] = round(_time_us(_program(fused_matvec_reference, kind, None), args), 2)
    best = None
    for label, tuning in TUNINGS.items():
        try:
            us = _time_us(_program(fused_matvec, kind, tuning), args)
        except Exception as err:  # a launch shape Triton cannot compile is reported
            row[f"{label}_us"] = f"{type(err).__name__}"
            continue
        row[f"{label}_us"] = round(us, 2)
        if best is None or us < best[1]:
            best = (label, us)
    row["best"] = best[0] if best else None
    row["best_tb_s"] = round(weight_bytes / best[1] / 1e6, 2) if best else None
    row["default_over_xla"] = (
        round(row["default_us"] / row["xla_us"], 3)
        if isinstance(row["default_us"], float)
        else None
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--batches", default="1,4")
    args = parser.parse_args()
    top = dict(command="python3 " + " ".join(sys.argv), device=device_name(), copies=COPIES)
    top["tunings"] = {label: tuning._asdict() for label, tuning in TUNINGS.items()}
    rows = []
    for name, width, outputs, kind in MATVEC_CASES:
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(_case(name, width, outputs, kind, batch))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:  # after every row, so a run cut short keeps what it measured
                args.out.write_text(json.dumps(top | dict(rows=rows), indent=1) + "\n")
    keys = ("case", "batch", "weight_mb", "xla_us", "default_us", "best", "best_tb_s")
    print(format_table([{k: r[k] for k in keys} for r in rows]))


if __name__ == "__main__":
    main()
