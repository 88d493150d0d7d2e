"""Shared benchmark infrastructure: model shapes, device roofline probes, timers, result files.

Every GPU benchmark imports this module first. It owns:
- `SHAPES`: the model shapes we benchmark, as `transformers.LlamaConfig` keyword arguments;
- roofline probes measured in JAX (`measure_hbm_bandwidth_jax`, `measure_matmul_flops_jax`) and the
  decode memory floor built on them (`param_count`, `decode_bytes`, `decode_floor_ms`);
- timers for JAX (`time_jax`) and torch (`time_torch_cuda`) that report the same percentiles;
- `device_name` and `write_result`, the JSON result format under `bench/results/`.

Torch baselines and JAX runs share one process (one GPU), so this module makes JAX allocate GPU
memory on demand instead of grabbing 75% of it at start-up: it sets
`XLA_PYTHON_CLIENT_PREALLOCATE=false` before importing jax unless the caller already chose
(`XLA_PYTHON_CLIENT_PREALLOCATE` or `XLA_PYTHON_CLIENT_MEM_FRACTION` in the environment). Bench
scripts must import this module before anything that imports jax, run the torch baselines first,
call `bench.hf_baseline.free_torch()`, then run JAX.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if not {"XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION"} & os.environ.keys():
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

import jax  # noqa: E402  (must follow the allocator setting above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B (github.com/jzhang38/TinyLlama), context extended to 4096 for the benchmarks.
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # Llama-3.1-8B. Its llama3 RoPE scaling needs max_position_embeddings above
    # original_max_position_embeddings (transformers warns otherwise), so we keep 3.1's 131072.
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # A CPU-sized shape with GQA, for smoke tests of every code path.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=10000.0,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}

Timing = dict[str, float]


def _on_accelerator() -> bool:
    return jax.devices()[0].platform != "cpu"


def _percentiles(samples_ms: Sequence[float]) -> Timing:
    p10, median, p90 = np.percentile(np.asarray(samples_ms), [10, 50, 90])
    return dict(median_ms=float(median), p10_ms=float(p10), p90_ms=float(p90))


def time_jax(fn: Callable[..., Any], *args: Any, warmup: int = 3, iters: int = 20) -> Timing:
    """Wall time of `fn(*args)` until its outputs are ready, in ms (median, p10, p90).

    The first `warmup` calls (compilation included) are not timed. `fn` is called with the same
    `args` every time, so it must not donate them: thread donated state through a closure.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return _percentiles(samples)


def time_torch_cuda(
    fn: Callable[[], Any],
    warmup: int = 3,
    iters: int = 20,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time of `fn()` in ms (median, p10, p90): CUDA events on a GPU, perf_counter on the CPU.

    Each iteration starts on an idle device (synchronised), so the time covers the host work of
    launching `fn` as well as its kernels. `setup()`, if given, runs before every call, untimed.
    """
    import torch  # torch is a baseline-only dependency; JAX-only benchmarks never load it

    cuda = torch.cuda.is_available()
    samples = []
    for i in range(warmup + iters):
        if setup is not None:
            setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed_ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed_ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            samples.append(elapsed_ms)
    return _percentiles(samples)


def measure_hbm_bandwidth_jax(nbytes: int | None = None, iters: int = 10) -> float:
    """Device memory bandwidth in bytes/s: an elementwise `x + 1` over an `nbytes` array.

    Counts the bytes read plus the bytes written. Defaults to 1 GiB on an accelerator (far past
    any cache) and 16 MiB on the CPU.
    """
    if nbytes is None:
        nbytes = 2**30 if _on_accelerator() else 2**24
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    timing = time_jax(jax.jit(lambda a: a + 1), x, warmup=2, iters=iters)
    return 2 * x.nbytes / (timing["median_ms"] * 1e-3)


def measure_matmul_flops_jax(n: int | None = None, iters: int = 10) -> float:
    """Dense bf16 matmul rate in FLOP/s of an n^3 product (n 8192 on an accelerator, 512 on CPU)."""
    if n is None:
        n = 8192 if _on_accelerator() else 512
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    timing = time_jax(jax.jit(jnp.matmul), a, b, warmup=2, iters=iters)
    return 2 * n**3 / (timing["median_ms"] * 1e-3)


def param_count(shape: dict[str, Any]) -> int:
    """Parameters of a Llama-family decoder (no biases) with this shape."""
    hidden, vocab, layers = shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"]
    head_dim = shape.get("head_dim", hidden // shape["num_attention_heads"])
    q_width = shape["num_attention_heads"] * head_dim
    kv_width = shape["num_key_value_heads"] * head_dim
    attention = 2 * hidden * q_width + 2 * hidden * kv_width
    mlp = 3 * hidden * shape["intermediate_size"]
    per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embeddings = vocab * hidden * (1 if shape.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + hidden + embeddings


def decode_bytes(shape: dict[str, Any], batch: int, context: int, dtype_bytes: int = 2) -> int:
    """Bytes one decode step must read from device memory: weights plus the KV cache.

    The embedding table counts only the `batch` rows the step gathers; the lm_head counts in full,
    also when it is tied to the embedding table (then the table is read once as lm_head). The KV
    term is 2 (K and V) * layers * batch * context * kv_heads * head_dim * dtype_bytes.
    """
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    head_dim = shape.get("head_dim", hidden // shape["num_attention_heads"])
    untied_embedding = 0 if shape.get("tie_word_embeddings", False) else vocab * hidden
    weights = param_count(shape) - untied_embedding + batch * hidden
    kv = 2 * shape["num_hidden_layers"] * batch * context * shape["num_key_value_heads"] * head_dim
    return (weights + kv) * dtype_bytes


@functools.cache
def _measured_bandwidth() -> float:
    return measure_hbm_bandwidth_jax()


def decode_floor_ms(
    shape: dict[str, Any],
    batch: int,
    context: int,
    dtype_bytes: int = 2,
    bw: float | None = None,
) -> float:
    """The memory-bound floor of one decode step in ms: `decode_bytes(...)` over bandwidth `bw`.

    `bw` is in bytes/s; None measures it once per process with `measure_hbm_bandwidth_jax()`.
    See `decode_bytes` for what is counted (embedding rows gathered only, lm_head in full).
    """
    bandwidth = _measured_bandwidth() if bw is None else bw
    return decode_bytes(shape, batch, context, dtype_bytes) / bandwidth * 1e3


def device_name(device_kind: str | None = None) -> str:
    """Short lower-case device name ("h100", "h200", "a100", "cpu") from a JAX `device_kind`.

    Defaults to the kind of `jax.devices()[0]`. A kind without a recognisable model number comes
    back slugified ("NVIDIA RTX PRO 6000" -> "nvidia-rtx-pro-6000").
    """
    kind = (jax.devices()[0].device_kind if device_kind is None else device_kind).lower()
    model = re.search(r"\b(g?[abhlv]\d{1,3})\b", kind)
    if model:
        return model.group(1)
    return re.sub(r"[^a-z0-9]+", "-", kind).strip("-")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a fixed-width text table; columns in order of first appearance, "-" where absent."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [columns, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(s.rjust(w) for s, w in zip(line, widths)) for line in lines)


def write_result(path: str | Path, rows: list[dict[str, Any]], command: str, **top: Any) -> Path:
    """Write `{"command", "device", "rows", **top}` as JSON (sorted keys) and print rows as a table.

    `device` defaults to `device_name()`; pass `device=...` in `top` to override it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name(), **top, "command": command, "rows": rows}
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(format_table(rows))
    print(f"wrote {path}")
    return path
