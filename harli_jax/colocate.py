"""``harli-jax train-colocated``: serve a request trace while fine-tuning, and report both sides.

Owns the experiment around the engine: building engine + scheduler + job, compiling and
calibrating before the clock starts, replaying the trace's arrivals in real time from a driver
thread, the live progress line, and the final report (JSON and a PNG of TPOT and fine-tune
throughput over time). The engine loop does the real work; nothing here touches the device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from harli_jax.cli_common import compile_inference
from harli_jax.engine.finetune import FineTuneJob
from harli_jax.engine.loop import Engine, QueueFull, RequestStream
from harli_jax.engine.metrics import EngineMetrics
from harli_jax.engine.sampling import SamplingParams
from harli_jax.llm import LLM
from harli_jax.sched import static
from harli_jax.sched.calibration import Calibration
from harli_jax.sched.config import SchedulerConfig
from harli_jax.sched.predictor import Predictor
from harli_jax.sched.roofline import measure_device_rates
from harli_jax.sched.runner import cut_name
from harli_jax.sched.scheduler import ColocationScheduler
from harli_jax.sched.trace import TracedRequest


@dataclasses.dataclass
class ReplayResult:
    submitted: int = 0
    refused: int = 0  # 429s: the engine's queue was full
    finished: int = 0


# Where `run_colocated` starts when its caller passes no predictor: a saved profile's predictor
# and calibration (the CLI's --profile sets it), else nothing (calibrate from scratch).
_START: contextvars.ContextVar[tuple[Predictor, Calibration] | None] = contextvars.ContextVar(
    "harli_colocate_start", default=None
)


@contextlib.contextmanager
def start_from(predictor: Predictor, calibration: Calibration) -> Iterator[None]:
    """Within this block, `run_colocated` without a predictor starts from copies of these."""
    token = _START.set((predictor, calibration))
    try:
        yield
    finally:
        _START.reset(token)


def calibrate(
    llm: LLM,
    scheduler: ColocationScheduler,
    job: FineTuneJob,
    progress=print,
    measure: bool = True,
) -> float:
    """Compiles every program the run can use (each inference shape bucket, each cut of the train
    step) and, with ``measure``, measures them, before the clock starts. Returns the seconds it
    took. Without ``measure`` (the scheduler starts calibrated) it only compiles."""
    start = time.perf_counter()
    compile_inference(llm.engine, show=progress is not _quiet)
    verb = "compiling and calibrating" if measure else "compiling"
    progress(f"{verb} the train step's micro-steps ...")
    scheduler.runner.calibrate(job, measure=measure, fuse_spans=scheduler.config.fuse_spans)
    # Its steps are the job's: a checkpoint keeps them, and the first save of a process (Orbax
    # setting itself up in the writer thread, which contends for the GIL) is out of the run.
    job.checkpoint()
    job.checkpointer.wait()
    if measure:
        calibrate_inference(llm, scheduler)
    return time.perf_counter() - start


def calibrate_inference(llm: LLM, scheduler: ColocationScheduler, max_tokens: int = 8) -> None:
    """Short requests at every decode batch bucket (1, 2, 4, ...): the predictor's first
    inference samples and the steps the static budget is derived from."""
    core, rows = llm.engine, 1
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    while rows <= core.config.max_num_seqs:
        for i in range(rows):
            core.add_request([1 + i % 7] * 4, params)
        while core.has_unfinished():
            core.step()
            scheduler.observe_inference(core.last_report, calibrating=True)
        rows *= 2


def _quiet(*_, **__) -> None:
    pass


def replay(
    engine: Engine, trace: list[TracedRequest], vocab_size: int, seed: int = 0
) -> ReplayResult:
    """Submits the trace's requests at their arrival times (random prompt tokens of the traced
    length, ``ignore_eos`` so outputs have the traced length) and waits for all to finish."""
    rng = np.random.default_rng(seed)
    result = ReplayResult()
    streams: list[RequestStream] = []
    start = time.perf_counter()
    for request in trace:
        delay = request.arrival_s - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        prompt = rng.integers(3, vocab_size, size=request.prompt_tokens).tolist()
        params = SamplingParams(max_tokens=request.output_tokens, temperature=0.0, ignore_eos=True)
        try:
            streams.append(engine.submit(prompt, params))
            result.submitted += 1
        except QueueFull:
            result.refused += 1
    for stream in streams:
        if stream.result() is not None:
            result.finished += 1
    return result


# TPOT samples the live line's percentiles cover: a copy of them all, every 0.5 s under the lock
# every token takes, would grow with the run.
RECENT = 4096


def progress_line(metrics: EngineMetrics, job: FineTuneJob) -> str:
    s = metrics.summary(recent=RECENT)
    loss = f"{job.losses[-1]:.3f}" if job.losses else "-"
    return (
        f"step {job.step}/{job.config.steps} loss {loss} | ft {s['finetune_tok_s']:.0f} tok/s | "
        f"TPOT p50 {s['tpot_p50_ms']:.1f} p99 {s['tpot_p99_ms']:.1f} ms (recent) | "
        f"SLO {100 * s['slo_attainment']:.1f}% | done {s['requests_finished']}"
    )


def run_colocated(
    llm: LLM,
    job: FineTuneJob,
    trace: list[TracedRequest],
    config: SchedulerConfig,
    *,
    predictor: Predictor | None = None,
    calibration: Calibration | None = None,
    show_progress: bool = True,
) -> dict:
    """Serves ``trace`` while ``job`` trains under ``config``'s policy; returns the report.

    With a ``calibration`` (and the ``predictor`` it was made with; or, with neither, inside
    :func:`start_from`), the run starts calibrated: copies of both are used, and the job's programs
    are only compiled, not measured again, unless they have run in this job already."""
    if predictor is None and calibration is None and _START.get() is not None:
        predictor, calibration = _START.get()
        predictor = predictor.copy()
    predictor = predictor or Predictor(measure_device_rates())
    calibrated = calibration is not None
    # Calibration trains real steps; they count for the job, not for the measured run.
    scheduler = ColocationScheduler(
        config, predictor, EngineMetrics(), calibration.copy() if calibrated else None
    )
    say = print if show_progress else _quiet
    job.use_arena(llm.engine.arena)  # its step state shares the KV cache's pages
    if calibrated and scheduler.runner.is_warm(job):
        compile_s = 0.0
    else:
        compile_s = calibrate(llm, scheduler, job, progress=say, measure=not calibrated)
    say(f"compiled{'' if calibrated else ' and calibrated'} in {compile_s:.1f} s")
    job.abandon()  # a step an earlier run left open is trained again from its start
    predictor.clear_errors()  # the report's predictor errors cover the run only
    scheduler.add_job(job)
    metrics = scheduler.metrics = EngineMetrics(tpot_slo_s=config.tpot_slo_s)
    steps_before, tokens_before = job.step, job.tokens_trained
    engine = Engine(llm.engine, scheduler, metrics=metrics).start()
    stop = threading.Event()

    def show():
        while not stop.wait(0.5):
            say("\r" + progress_line(metrics, job), end="", flush=True)

    # Only when shown: its summaries take the metrics lock and the GIL from the loop thread.
    ticker = threading.Thread(target=show, daemon=True)
    if show_progress:
        ticker.start()
    try:
        result = replay(engine, trace, llm.engine.model_config.vocab_size)
    finally:
        stop.set()
        engine.stop()
    say("\r" + progress_line(metrics, job))
    summary = metrics.summary()
    tpot = [(t - metrics.start, gap) for t, gap in metrics.tpot_s]
    finetune = [(t - metrics.start, n) for t, n in metrics.finetune]
    return {
        "policy": config.policy,
        "tpot_slo_ms": config.tpot_slo_s * 1e3,
        "compile_s": compile_s,
        "started_calibrated": calibrated,
        "static_budget_ms": static.budget(config, scheduler.calibration) * 1e3,
        "static_cut": cut_name(static.cut(config, scheduler.calibration, job)),
        "dispatch_ms": scheduler.runner.inflight.dispatch_s * 1e3,  # a micro-step's, host
        "slo_backoff_ms": scheduler.backoff.seconds * 1e3,  # harli's, at the end of the run
        "fill_share": scheduler.gate.fill_share,  # harli's iterations its fill gate let fill
        "fill_outcomes": dict(scheduler.fill_outcomes),  # harli's fills: on time, or why late
        "step_starts": scheduler.starts.summary(),  # where harli started its train steps
        "requests": dataclasses.asdict(result),
        "finetune_steps": job.step - steps_before,
        "finetune_tokens": job.tokens_trained - tokens_before,
        "predictor": scheduler.predictor_errors(),
        **summary,
        "while_training": while_training(tpot, finetune, config.tpot_slo_s),
        "timeline": {
            "tpot": tpot,
            "finetune": finetune,
            "programs": [(t - metrics.start, f, s) for t, f, s in metrics.programs],
        },
    }


def while_training(
    tpot: list[tuple[float, float]], finetune: list[tuple[float, int]], slo_s: float
) -> dict[str, float]:
    """TPOT samples (time, gap) from the first to the last fine-tune step ``finetune`` (time,
    tokens) records: their count, share within ``slo_s`` and p99. A job that ends early in the
    trace leaves serve-only tokens after it, which the whole run's attainment counts too."""
    first, last = (finetune[0][0], finetune[-1][0]) if finetune else (math.inf, -math.inf)
    gaps = np.array([gap for t, gap in tpot if first <= t <= last])
    if not gaps.size:
        return {"tokens": 0, "slo_attainment": float("nan"), "tpot_p99_ms": float("nan")}
    return {
        "tokens": int(gaps.size),
        "slo_attainment": float(np.mean(gaps <= slo_s)),
        "tpot_p99_ms": float(np.percentile(gaps, 99) * 1e3),
    }


def plot(report: dict, path: Path) -> None:
    """TPOT samples against the SLO (top) and fine-tune tokens/s in 1 s bins (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    tpot = np.array(report["timeline"]["tpot"]).reshape(-1, 2)
    top.plot(tpot[:, 0], tpot[:, 1] * 1e3, ".", markersize=2, label="TPOT (ms)")
    top.axhline(report["tpot_slo_ms"], color="red", linestyle="--", label="SLO")
    top.set_ylabel("ms")
    top.legend(loc="upper right")
    ft = np.array(report["timeline"]["finetune"]).reshape(-1, 2)
    if len(ft):
        edges = np.arange(0, ft[:, 0].max() + 2)
        tokens, _ = np.histogram(ft[:, 0], bins=edges, weights=ft[:, 1])
        bottom.step(edges[:-1], tokens, where="post")
        for axis in (top, bottom):  # the stretch the job trained in
            axis.axvspan(ft[0, 0], ft[-1, 0], color="tab:green", alpha=0.08)
    bottom.set_ylabel("fine-tune tok/s")
    bottom.set_xlabel("seconds")
    training = report["while_training"]["slo_attainment"]
    fig.suptitle(
        f"policy {report['policy']}: SLO attainment {100 * report['slo_attainment']:.1f}% "
        f"({100 * training:.1f}% while fine-tuning, shaded), "
        f"fine-tune {report['finetune_tok_s']:.0f} tok/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    plot(report, out_dir / "colocation.png")
