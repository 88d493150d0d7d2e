"""One decode step of the engine's own program on the GPU: its kernels per step (count and time by
kernel), one middle layer's kernels in order, and the optimized HLO (written to $OUT, else /tmp).
Random weights of a `bench.common.SHAPES` shape, context 1024.

    python3 bench/decode_kernels.py tinyllama-1.1b 1,32
"""

from __future__ import annotations

import collections
import functools
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import decode_bench as db  # noqa: E402
from bench.decode_profile import gpu_kernels  # noqa: E402

CONTEXT = 1024
CALLS = 3  # steps profiled; the middle one is reported


def report(model, name: str, batch: int, out: Path) -> None:
    engine = db._engine(model, batch, CONTEXT)
    rng = np.random.default_rng(0)
    _, packed = db._step_args(db._decode_inputs(engine, batch, CONTEXT, rng))
    step = functools.partial(db._engine_step, engine, 1)
    cache, timing = db._time_chained(step, engine.cache, packed)
    lowered = engine._forward.lower(engine.weights, cache, *packed, width=1, variant=db.VARIANT)
    (out / f"hlo_{name}_b{batch}.txt").write_text(lowered.compile().as_text())

    def run() -> None:
        nonlocal cache
        for _ in range(CALLS):
            cache, sampled = step(cache, *packed)
        jax.block_until_ready((cache, sampled))

    kernels = sorted(gpu_kernels(run), key=lambda kernel: kernel[1])
    per_step = len(kernels) // CALLS
    if not per_step:
        print("no GPU kernels")
        return
    one = kernels[per_step : 2 * per_step]
    busy_us = sum(k[2] for k in one) / 1e3
    span_us = (one[-1][1] + one[-1][2] - one[0][1]) / 1e3
    print(f"B={batch} {timing} kernels/step {per_step} busy {busy_us:.0f} us span {span_us:.0f} us")
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for kernel_name, _, duration, _ in one:
        by_name[kernel_name].append(duration / 1e3)
    for kernel_name, times in sorted(by_name.items(), key=lambda item: -sum(item[1])):
        total = sum(times)
        mean = total / len(times)
        print(f"  {len(times):4d} x {mean:7.2f} us = {total:7.1f}  {kernel_name[:80]}")
    attention = [i for i, kernel in enumerate(one) if "paged_decode" in kernel[0]]
    if len(attention) > 11:  # the 11th layer, from the kernels before its attention on
        for kernel in one[attention[10] - 8 : attention[11] - 7]:
            print(f"    {kernel[2] / 1e3:6.2f} us  {kernel[0][:100]}")


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "tinyllama-1.1b"
    batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1").split(",")]
    out = Path(os.environ.get("OUT", "/tmp"))
    model, _ = db.load_model(name, None)
    for batch in batches:
        report(model, name, batch, out)


if __name__ == "__main__":
    main()
