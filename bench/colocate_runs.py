"""The runs of `bench/colocate.py`: one policy over one trace (`run_one`), and what runs before
the measured ones: static's budget tuning (`tune_static`) and harli's warm-up (`warm_up`), both on
a heavy-load trace of another seed than the runs'."""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable

import numpy as np

from bench.colocate_setup import Setup, load_rate, load_trace
from harli_jax.colocate import run_colocated
from harli_jax.engine.finetune import FineTuneJob
from harli_jax.llm import LLM
from harli_jax.sched.config import SchedulerConfig
from harli_jax.sched.scheduler import ColocationScheduler

STATIC_SHARES = (1.0, 0.75, 0.5, 0.25)  # of the headroom static's budget is tuned among
STATIC_BISECTIONS = 2  # then between the largest that met the SLO and the share above it


def program_totals(programs: list[tuple[float, str, float | None]], tokens: int) -> dict:
    """Per program family over a run (``programs``: its timeline; entries before the trace
    are calibration): how many ran, their summed and median seconds (ms; programs whose time is
    not known are counted, not timed), and fine-tune tokens per millisecond of train programs,
    the rate a fill turns its time into tokens."""
    by_family: dict[str, list[float | None]] = {}
    for start, name, seconds in programs:
        if start >= 0:
            by_family.setdefault(name, []).append(seconds)
    totals = {}
    for name, seconds in sorted(by_family.items()):
        timed = [s for s in seconds if s is not None]
        total_ms = 1e3 * sum(timed)
        median_ms = 1e3 * float(np.median(timed)) if timed else None
        totals[name] = dict(
            n=len(seconds), timed=len(timed), total_ms=total_ms, median_ms=median_ms
        )
    train_ms = sum(v["total_ms"] for k, v in totals.items() if k.startswith("train/"))
    return dict(families=totals, tokens_per_train_ms=tokens / train_ms if train_ms else None)


def run_one(
    llm,
    job,
    trace,
    config: SchedulerConfig,
    base: ColocationScheduler,
    predictor=None,
    timeline: bool = False,
) -> dict:
    """One policy over one trace, starting from copies of the shared calibration and predictor
    (or from ``predictor``, which the run then trains on); its summary (with ``timeline``: and
    the run's timelines)."""
    predictor = predictor or base.predictor.copy()
    started = time.perf_counter()
    report = run_colocated(
        llm,
        job,
        trace,
        config,
        predictor=predictor,
        calibration=base.calibration,
        show_progress=False,
    )
    ended = time.perf_counter()
    busy_s, decode_batch = predictor.since(ended - report["elapsed_s"])
    gc.collect()
    # Not report["finetune_tok_s"]: run_colocated's metrics start before the trace does.
    tokens = sum(n for t, n in report["timeline"]["finetune"] if t >= 0)
    errors = report["predictor"]
    return dict(
        ft_tok_s=tokens / report["elapsed_s"],
        slo_attainment=report["slo_attainment"],
        tpot_p50_ms=report["tpot_p50_ms"],
        tpot_p99_ms=report["tpot_p99_ms"],
        ttft_p99_ms=report["ttft_p99_ms"],
        decode_mape=errors["inference"]["mape"],
        decode_p99_rel_error=errors["inference"]["p99_rel_error"],
        predictor=errors,
        static_budget_ms=report["static_budget_ms"],
        slo_backoff_ms=report["slo_backoff_ms"],
        fill_share=report["fill_share"],
        fill_outcomes=report["fill_outcomes"],
        step_starts=report["step_starts"],
        static_cut=report["static_cut"],
        dispatch_ms=report["dispatch_ms"],
        programs=program_totals(report["timeline"]["programs"], tokens),
        decode_batch=decode_batch,
        busy_share=busy_s / report["elapsed_s"],
        finished=report["requests"]["finished"],
        refused=report["requests"]["refused"],
        elapsed_s=report["elapsed_s"],
        setup_s=ended - started - report["elapsed_s"],
        **({"timeline": report["timeline"]} if timeline else {}),
        **({"predictions": predictor.logged(ended - report["elapsed_s"])} if timeline else {}),
    )


def tune_static(
    llm: LLM, job: FineTuneJob, base: ColocationScheduler, setup: Setup, slo_ms: float
) -> tuple[float, list[dict]]:
    """Static's budget (ms), tuned offline as FlexLLM's token budget is: the largest share of
    the headroom (SLO - median calibrated decode step - loop overhead) under which static keeps
    ``slo_target`` of its tokens within the SLO at the heavy load, on a trace of another seed
    than the runs': the largest of ``STATIC_SHARES`` that does, then ``STATIC_BISECTIONS``
    halvings of the gap to the share above it that did not (the quarter steps alone left static
    up to a quarter of its headroom short). Chosen once, for both loads; where none does, the
    halvings run from 0 (bursty traffic failed every quarter step on the H100). Also returns
    the sweep's (budget, attainment, tokens/s)."""
    config = SchedulerConfig("static", slo_ms * 1e-3)
    decode_s = float(np.median(base.calibration.inference_s))
    headroom_ms = (config.tpot_slo_s - decode_s - config.loop_overhead_s) * 1e3
    trace = load_trace(load_rate("heavy", setup, slo_ms), setup.duration_s / 2, setup, seed=1)
    sweep = []

    def meets(share: float) -> bool:
        budget_ms = share * headroom_ms
        tuned = dataclasses.replace(config, static_budget_s=budget_ms * 1e-3)
        result = run_one(llm, job, trace, tuned, base)
        sweep.append(
            dict(budget_ms=budget_ms, slo_attainment=result["slo_attainment"],
                 ft_tok_s=result["ft_tok_s"])
        )  # fmt: skip
        say(f"static tuning: {budget_ms:.2f} ms -> {result['slo_attainment']:.4f} of tokens")
        return result["slo_attainment"] >= config.slo_target

    return largest_share(meets) * headroom_ms, sweep


def largest_share(meets: Callable[[float], bool]) -> float:
    """The largest of ``STATIC_SHARES`` that ``meets``, then ``STATIC_BISECTIONS`` halvings of
    the gap to the share above it that did not; where none does, the halvings run from 0."""
    failed = None  # the smallest share that did not meet the SLO
    for share in STATIC_SHARES:
        if meets(share):
            break
        failed = share
    else:  # none did: halve toward no fine-tuning in iterations at all
        share = 0.0
    if failed is not None:
        for _ in range(STATIC_BISECTIONS):
            middle = (share + failed) / 2
            if meets(middle):
                share = middle
            else:
                failed = middle
    return share


def warm_up(
    llm: LLM, job: FineTuneJob, base: ColocationScheduler, setup: Setup, slo_ms: float
) -> dict:
    """Runs harli once on static's tuning trace (heavy load, another seed than the runs'), as
    a server that has been running would be: every run then starts from the predictor it left
    and the SLO backoff it settled at (which a 12 s run spends a few overruns learning from
    zero). Returns the warm-up's tokens/s, SLO attainment, final backoff (ms) and fill share."""
    trace = load_trace(load_rate("heavy", setup, slo_ms), setup.duration_s / 2, setup, seed=1)
    predictor = base.predictor.copy()
    result = run_one(llm, job, trace, SchedulerConfig("harli", slo_ms * 1e-3), base, predictor)
    base.predictor = predictor
    base.calibration.slo_backoff_s = result["slo_backoff_ms"] * 1e-3
    return {
        key: result[key] for key in ("ft_tok_s", "slo_attainment", "slo_backoff_ms", "fill_share")
    }


_STARTED = time.perf_counter()


def say(text: str) -> None:
    """A progress line, stamped with the seconds since the script started."""
    print(f"[{time.perf_counter() - _STARTED:6.0f} s] {text}", flush=True)
