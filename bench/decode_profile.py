"""Where a jitted step's time goes on the GPU: kernels per step from a profiler trace, the kinds of
instructions in the compiled HLO, and how close single projections come to memory bandwidth.

Used by `bench/decode.py --profile`; every function also runs on the CPU (the trace then has no GPU
plane and the kernel counts come back empty).
"""

from __future__ import annotations

import collections
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench.common import time_jax

# HLO instructions that launch work on the device (the rest are views, tuples and parameters).
_LAUNCHING = ("fusion", "custom-call", "copy", "scatter", "gather", "while", "conditional", "sort")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = .*?\b([a-z][\w-]*)\(")


Kernel = tuple[str, int, int, dict[str, Any]]  # (name, start ns, duration ns, stats)
HostEvent = tuple[str, str, int, int]  # (thread, name, start ns, duration ns)


def trace_events(run: Callable[[], Any]) -> tuple[list[Kernel], list[HostEvent]]:
    """Runs ``run()`` under the profiler (Python function tracing off: it would slow the host
    down many times over). Returns the GPU's kernels (memory copies left out; none on a CPU)
    and the host's events with their threads' names, both on the trace's one clock."""
    from jax.profiler import ProfileData

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, profiler_options=options)
        run()
        jax.profiler.stop_trace()
        data = ProfileData.from_file(str(next(Path(trace_dir).rglob("*.xplane.pb"))))
    gpu = data.find_plane_with_name("/device:GPU:0")
    kernels = [
        (event.name, event.start_ns, event.duration_ns, dict(event.stats))
        for line in (gpu.lines if gpu is not None else ())
        if line.name.startswith("Stream")
        for event in line.events
        if not event.name.startswith("Memcpy")
    ]
    host = data.find_plane_with_name("/host:CPU")
    host_events = [
        (line.name, event.name, event.start_ns, event.duration_ns)
        for line in (host.lines if host is not None else ())
        for event in line.events
    ]
    return kernels, host_events


def gpu_kernels(run: Callable[[], Any]) -> list[Kernel]:
    """The GPU's kernels of ``run()``: see :func:`trace_events`."""
    return trace_events(run)[0]


def kernel_profile(run: Callable[[], Any], steps: int, top: int = 8) -> dict[str, Any]:
    """Runs ``run()`` (which must execute ``steps`` steps and block) under the profiler.

    Returns kernels per step, GPU busy time per step (sum of kernel durations) and the span per
    step (first kernel start to last kernel end, over ``steps``), with the ``top`` kernels by time.
    Busy much less than span means launch gaps; many kernels of a few microseconds mean launch- and
    tail-bound work that fusion or CUDA graphs would shrink.
    """
    events = gpu_kernels(run)
    if not events:
        return {}
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, _, duration, _ in events:
        by_name[name].append(duration)
    start = min(e[1] for e in events)
    end = max(e[1] + e[2] for e in events)
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "kernels_per_step": len(events) / steps,
        "busy_us_per_step": sum(e[2] for e in events) / steps / 1e3,
        "span_us_per_step": (end - start) / steps / 1e3,
        "top_kernels": [
            {
                "name": name[:70],
                "per_step": len(durations) / steps,
                "us_per_step": sum(durations) / steps / 1e3,
            }
            for name, durations in ranked
        ],
    }


def hlo_summary(compiled_text: str) -> dict[str, Any]:
    """Counts the device-launching instructions of a compiled module outside fused computations,
    the custom-call targets (cuBLAS, Triton, ...), and copies of more than 1 MiB (which, in a step
    that donates its cache, would mean the cache is being copied)."""
    counts: collections.Counter[str] = collections.Counter()
    targets: collections.Counter[str] = collections.Counter()
    big_copies = []
    skip = False
    for line in compiled_text.splitlines():
        if line and not line[0].isspace():  # a computation header (or the closing brace)
            skip = any(tag in line for tag in ("fused", "region", "triton", "wrapped"))
            continue
        match = _INSTRUCTION.match(line)
        if skip or not match or match.group(1) not in _LAUNCHING:
            continue
        op = match.group(1)
        counts[op] += 1
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            targets[target.group(1) if target else "?"] += 1
        if op == "copy" and _bytes_of(line) > 2**20:
            big_copies.append(line.strip()[:160])
    return {
        "ops": dict(counts),
        "custom_calls": dict(targets),
        "big_copies": big_copies,
        # dot merging concatenates weights that share an input: a copy of them in every step
        "big_concatenates": sum(
            _bytes_of(line) > 2**20
            for line in compiled_text.splitlines()
            if " concatenate(" in line
        ),
    }


def _bytes_of(instruction: str) -> int:
    shape = re.search(r"= (\w+)\[([\d,]*)\]", instruction)
    if not shape:
        return 0
    bits = re.search(r"\d+", shape.group(1))  # f32, bf16, s32, u8; pred has no width: a byte
    size = int(bits.group()) // 8 if bits else 1
    for dim in filter(None, shape.group(2).split(",")):
        size *= int(dim)
    return size


def projection_bandwidth(
    batch: int, in_features: int, out_features: int, total_bytes: int = 2**30
) -> float:
    """Bytes/s at which ``x [batch, in] @ W.T`` reads a bf16 weight ``[out, in]``, in one program of
    many such products over distinct weights (``total_bytes`` of them, far past the L2 cache), so
    each product streams its weight from device memory as a decode step's projections do."""
    weight_bytes = 2 * in_features * out_features
    copies = min(256, max(2, total_bytes // weight_bytes))
    keys = jax.random.split(jax.random.key(0), copies + 1)
    weights = [jax.random.normal(k, (out_features, in_features), jnp.bfloat16) for k in keys[1:]]
    x = jax.random.normal(keys[0], (batch, in_features), jnp.bfloat16)

    def products(x, weights):
        return [jnp.einsum("bi,oi->bo", x, w) for w in weights]

    lowered = jax.jit(products).lower(x, weights)
    try:  # products sharing `x` must not be merged (that would copy the weights together)
        compiled = lowered.compile({"xla_gpu_dot_merger_threshold_mb": 0})
    except Exception:  # an XLA without this option, or the CPU
        compiled = lowered.compile()
    timing = time_jax(compiled, x, weights, warmup=2, iters=5)
    return copies * weight_bytes / (timing["median_ms"] * 1e-3)


def chained_copy_bandwidth(nbytes: int = 2**31, calls: int = 10) -> float:
    """Device memory bandwidth in bytes/s (read plus write) of ``x + 1`` over ``nbytes``, with
    ``calls`` dispatches back to back per sample so host dispatch and synchronisation, which
    `bench.common.measure_hbm_bandwidth_jax` pays on every call, stay out of the number."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    step = jax.jit(lambda a: a + 1, donate_argnums=0)
    x = jax.block_until_ready(step(x))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            x = step(x)
        jax.block_until_ready(x)
        samples.append((time.perf_counter() - start) / calls)
    return 2 * nbytes / min(samples)
