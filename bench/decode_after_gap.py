"""The decode step's wall time after what ran before it (issue 6's heavy-load tail).

Co-located, every decode step follows fine-tune work, and on the H100 such steps took 0.15-0.9 ms
longer at the median than back to back, with a long tail (bench/NOTES.md, session 10), while the
GPU ran them as fast. This script measures that in one process: `rows` requests decode through
`EngineCore.step` (host included) in interleaved blocks, each step preceded by

- nothing (back to back), or one train micro-step of the colocate benchmark's job (cut into
  one-layer spans, run to its end), or a host sleep of 1 or 8 ms, or 8 ms of the host spinning;

then profiles a block back to back, one after micro-steps and one after 8 ms sleeps, and splits
each step's wall time: GPU busy time and first-to-last kernel span, the host's time before the
first kernel and after the last, and the host events (any thread) whose time per step grew over
back to back's. Wall time that grows where the GPU's does not is the host's side of the step. It
also reads the SM clock through NVML where the driver library is there, and the host cores'
clocks where /proc/cpuinfo has them.

    python3 bench/decode_after_gap.py                               # TinyLlama-1.1B shape (GPU)
    python3 bench/decode_after_gap.py --shapes tiny --quick --out /tmp/r   # CPU smoke run
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402  (sets the JAX allocator mode before jax loads)

# isort: split
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.colocate_setup import EOS, QUICK, Setup, make_job, write_data  # noqa: E402
from bench.decode_profile import trace_events  # noqa: E402
from bench.train import ensure_checkpoint  # noqa: E402
from harli_jax.engine.sampling import SamplingParams  # noqa: E402
from harli_jax.llm import LLM  # noqa: E402
from harli_jax.sched.calibration import Calibration  # noqa: E402
from harli_jax.sched.predictor import Predictor  # noqa: E402
from harli_jax.sched.roofline import DeviceRates  # noqa: E402
from harli_jax.sched.runner import MicroStepRunner, cuts  # noqa: E402

QUANTILES = (0.1, 0.5, 0.9, 0.99)
STEP_MARK = "decode_step"  # the trace annotation around each profiled decode step


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class SmClock:
    """The GPU's current SM clock (MHz) through NVML, or None where there is no driver library."""

    def __init__(self) -> None:
        try:
            self._nvml = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            self._nvml = None
            return
        self._handle = ctypes.c_void_p()
        if self._nvml.nvmlInit_v2() or self._nvml.nvmlDeviceGetHandleByIndex_v2(
            0, ctypes.byref(self._handle)
        ):
            self._nvml = None

    def __call__(self) -> float | None:
        if self._nvml is None:
            return None
        mhz = ctypes.c_uint()
        self._nvml.nvmlDeviceGetClockInfo(self._handle, 1, ctypes.byref(mhz))  # 1: NVML_CLOCK_SM
        return float(mhz.value)


def profile_steps(run: Callable[[], None]) -> list[dict]:
    """Runs ``run()``, which marks each decode step with a ``decode_step`` trace annotation,
    under the profiler. Returns per step: its wall time; on the GPU, its kernels' busy time and
    first-to-last span, and the host's time before the first kernel and after the last; and
    the host's time in each named event inside the step (any thread, clipped to the step)."""
    kernels, host = trace_events(run)
    windows = sorted((start, start + dur) for _, name, start, dur in host if name == STEP_MARK)
    kernels.sort(key=lambda k: k[1])
    steps = []
    for start, end in windows:
        inside = [(k[1], k[1] + k[2]) for k in kernels if start <= k[1] < end]
        step = {"wall_us": (end - start) / 1e3, "host_us": collections.Counter()}
        if inside:
            first, last = inside[0][0], max(e for _, e in inside)
            step |= {
                "busy_us": sum(e - s for s, e in inside) / 1e3,
                "span_us": (last - first) / 1e3,
                "before_first_kernel_us": (first - start) / 1e3,
                "after_last_kernel_us": (end - last) / 1e3,
            }
        for thread, name, s, dur in host:
            clipped = min(s + dur, end) - max(s, start)
            if name != STEP_MARK and clipped > 0:
                step["host_us"][f"{thread.split('/')[0]}: {name[:60]}"] += clipped / 1e3
        steps.append(step)
    return steps


def host_split(steps: list[dict], baseline: list[dict], top: int = 12) -> dict:
    """Median of each per-step measure, and the host events whose median time per step grew
    most over ``baseline``'s (each as [baseline us, these steps' us])."""
    measures = ("wall_us", "busy_us", "span_us", "before_first_kernel_us", "after_last_kernel_us")
    out = {m: round(float(np.median([s[m] for s in steps])), 1) for m in measures if m in steps[0]}
    names = {name for s in steps + baseline for name in s["host_us"]}

    def median(of: list[dict], name: str) -> float:
        return float(np.median([s["host_us"].get(name, 0.0) for s in of]))

    grown = sorted(names, key=lambda n: median(baseline, n) - median(steps, n))[:top]
    out["host_events_us"] = {
        n: [round(median(baseline, n), 1), round(median(steps, n), 1)] for n in grown
    }
    return out


def host_cpu_mhz() -> list[float] | None:
    """Min, median and max of the host cores' current clocks (MHz), or None where
    /proc/cpuinfo does not say (a VM may report a fixed figure)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    return [min(mhz), float(np.median(mhz)), max(mhz)] if mhz else None


def _quantiles(values: list[float]) -> list[float]:
    return [round(float(np.quantile(values, q)), 3) for q in QUANTILES] if values else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tinyllama-1.1b", help="one SHAPES name")
    parser.add_argument("--rows", type=int, default=16, help="requests decoding together")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved blocks per condition")
    parser.add_argument("--block", type=int, default=40, help="steps per block")
    parser.add_argument("--quick", action="store_true", help="small engine and job (CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--ckpt-root", type=Path, default=Path("/tmp/harli-bench-ckpt"))
    args = parser.parse_args()
    setup = QUICK if args.quick else Setup(page_size=128)
    llm = LLM(
        ensure_checkpoint(args.ckpt_root, args.shapes),
        "bfloat16",
        max_num_seqs=max(setup.max_num_seqs, args.rows),
        max_model_len=setup.max_model_len,
        page_size=setup.page_size,
        memory_fraction=setup.memory_fraction,
        max_loras=0,
    )
    core = llm.engine
    core.compile_all()  # a longer context's pages bucket must not compile inside a timed block
    work = Path(tempfile.mkdtemp())
    data = write_data(work / "data.jsonl", core.model_config.vocab_size, setup.ft_seq_len)
    job = make_job(llm, data, work / "job", setup)
    job.use_arena(core.arena)
    runner = MicroStepRunner(Predictor(DeviceRates(1e15, 3e12)), Calibration(), depth=1)
    one_layer = [c for c in cuts(job) if c[0] == 1][-1]  # one-layer spans, rows uncut

    def train_micro_step() -> None:
        runner.run(job, job.next_micro_step(one_layer))

    before = {
        "back_to_back": lambda: None,
        "after_train_micro_step": train_micro_step,
        "after_sleep_1ms": lambda: time.sleep(0.001),
        "after_sleep_8ms": lambda: time.sleep(0.008),
        "after_spin_8ms": lambda: _spin(0.008),
    }
    steps = len(before) * args.rounds * args.block + 3 * args.block + 8
    prompt = setup.mean_prompt
    if prompt + steps > setup.max_model_len:
        raise SystemExit(
            f"--rounds/--block: {steps} steps after a {prompt}-token prompt exceed the engine's "
            f"{setup.max_model_len} tokens"
        )
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(0)
    for _ in range(args.rows):
        vocab = core.model_config.vocab_size
        core.add_request(rng.integers(EOS + 1, vocab, size=prompt).tolist(), params)
    for _ in range(8):  # prefill, the first decode steps (compiles), the first micro-steps
        core.step()
        train_micro_step()
    clock = SmClock()
    walls: dict[str, list[float]] = {name: [] for name in before}
    clocks: dict[str, list[float]] = {name: [] for name in before}
    for _ in range(args.rounds):
        for name, work_before in before.items():
            for _ in range(args.block):
                work_before()
                mhz = clock()
                start = time.perf_counter()
                core.step()
                walls[name].append((time.perf_counter() - start) * 1e3)
                if mhz is not None:
                    clocks[name].append(mhz)

    def profiled_block(work_before: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.block):
                work_before()
                with jax.profiler.TraceAnnotation(STEP_MARK):
                    core.step()

        return run

    profiled = ("back_to_back", "after_train_micro_step", "after_sleep_8ms")
    host_mhz = {"before": host_cpu_mhz()}
    traced = {name: profile_steps(profiled_block(before[name])) for name in profiled}
    time.sleep(0.05)  # the cores' clocks after the host idled, where the VM reports them
    host_mhz["after_sleep"] = host_cpu_mhz()
    split = {name: host_split(traced[name], traced["back_to_back"]) for name in profiled}
    rows = [
        {
            "before": name,
            "rows": args.rows,
            "wall_ms_q10_q50_q90_q99": _quantiles(walls[name]),
            "sm_mhz_min": min(clocks[name], default=None),
        }
        for name in before
    ]
    command = "python3 " + " ".join(sys.argv)
    out = args.out / f"decode-after-gap-{common.device_name()}.json"
    common.write_result(
        out, rows, command, model=args.shapes, host_cpu_mhz=host_mhz, profiled=split
    )
    for name, parts in split.items():  # the host's side, last: the call's output keeps its tail
        print(name, {k: v for k, v in parts.items() if k != "host_events_us"})
        for event, (base, here) in parts["host_events_us"].items():
            print(f"    {here - base:+9.1f} us  {event}")


if __name__ == "__main__":
    main()
