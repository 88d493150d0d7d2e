"""Stage 1 of the latency predictor: the roofline a program's XLA cost analysis implies.

It owns the device's achievable rates (`DeviceRates`, measured once a process by
`measure_device_rates`) and the price of one program at those rates, max(flops / peak rate,
bytes / HBM bandwidth) (`roofline_seconds`). Stage 2 (`harli_jax.sched.correction`) corrects this
price with measured times.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

CostAnalysis = Mapping[str, float] | Sequence[Mapping[str, float]]


@dataclass(frozen=True)
class DeviceRates:
    """Achievable rates of one device: flop/s of a bf16 matmul, bytes/s of HBM traffic."""

    peak_flops: float
    hbm_bytes_per_s: float


def cost_dict(cost: CostAnalysis) -> Mapping[str, float]:
    """The one dict of `compiled.cost_analysis()`, whichever shape this jax version gives it in."""
    # Some jax versions return cost_analysis() as a one-element list of dicts.
    if isinstance(cost, Mapping):
        return cost
    if len(cost) != 1:
        raise ValueError(f"expected one cost-analysis dict, got {len(cost)}")
    return cost[0]


def roofline_seconds(cost: CostAnalysis, peak_flops: float, hbm_bytes_per_s: float) -> float:
    """Stage 1: the time a program needs at the device's rates, from `compiled.cost_analysis()`.

    XLA's numbers are only as good as its cost model: on GPU a program that is a single library call
    (a bare cuBLAS matmul) reports -1 (unknown), and a while loop (`lax.scan`) has its body counted
    once, not once per trip. Stage 2 absorbs a consistent undercount within a family; where a
    program is priced as unknown, pass an analytic {"flops", "bytes accessed"} dict instead.
    """
    cost = cost_dict(cost)
    # XLA marks unknown quantities with negative values; they contribute nothing.
    flops = max(0.0, float(cost.get("flops", 0.0)))
    bytes_accessed = max(0.0, float(cost.get("bytes accessed", 0.0)))
    return max(flops / peak_flops, bytes_accessed / hbm_bytes_per_s)


def _best_seconds_per_call(fn: Callable[..., jax.Array], *args: jax.Array) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up outside the timed region
    best, reps = math.inf, 5
    for _ in range(3):
        start = time.perf_counter()
        # Back-to-back dispatch amortises launch latency, which is not what we measure.
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / reps)
    return best


@functools.cache
def measure_device_rates() -> DeviceRates:
    """Measures peak bf16 matmul flop/s and HBM bandwidth of the default device, once a process.

    On an accelerator this allocates a little over 2 GiB transiently: call it before the arena
    claims device memory. The CPU sizes keep it well under a second.
    """
    on_cpu = jax.default_backend() == "cpu"
    # The copy must be far larger than the last-level cache to measure HBM, not cache.
    # On an H100 a 512 MiB copy still measured 7% below this 1 GiB one (launch and tail effects).
    n, copy_elems = (1024, 1 << 22) if on_cpu else (8192, 1 << 28)
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul_s = _best_seconds_per_call(jax.jit(jnp.matmul), a, a)
    x = jnp.zeros((copy_elems,), jnp.float32)
    # An elementwise op is a copy that XLA cannot elide: it reads x once and writes it once.
    copy_s = _best_seconds_per_call(jax.jit(lambda v: v + 1), x)
    return DeviceRates(peak_flops=2 * n**3 / matmul_s, hbm_bytes_per_s=2 * x.nbytes / copy_s)
