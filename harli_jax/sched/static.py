"""The ``static`` baseline's decisions, made as FlexLLM's released code makes them: a fine-tune
budget per iteration and a cut of the train step, both fixed before the run from calibrated
times, and a fill that runs micro-steps while their *calibrated* times fit what is left of the
budget. Nothing is predicted and nothing adapts to the load; the scheduler's docstring says why
this is the fair fixed budget.
"""

from __future__ import annotations

import math

import numpy as np

from harli_jax.engine.finetune import FineTuneJob, Granularity
from harli_jax.sched.calibration import Calibration, option_id
from harli_jax.sched.config import SchedulerConfig
from harli_jax.sched.runner import MicroStepRunner, cut_named, cuts, program_key


def budget(config: SchedulerConfig, calibration: Calibration) -> float:
    """Seconds of fine-tuning per iteration: ``static_budget_s`` if configured, else the SLO less
    the p99 calibrated decode step and the loop overhead (0 before any calibration)."""
    if config.static_budget_s is not None:
        return config.static_budget_s
    if not calibration.inference_s:
        return 0.0
    p99 = float(np.quantile(calibration.inference_s, 0.99))
    return max(0.0, config.tpot_slo_s - p99 - config.loop_overhead_s)


def cut(config: SchedulerConfig, calibration: Calibration, job: FineTuneJob) -> Granularity:
    """The coarsest cut whose slowest calibrated micro-step fits the budget, else the finest (or
    ``fixed_cut`` where configured)."""
    return _cut_within(config, calibration, job, budget(config, calibration))


def _cut_within(
    config: SchedulerConfig, calibration: Calibration, job: FineTuneJob, budget_s: float
) -> Granularity:
    """`cut` for a budget of ``budget_s`` seconds, already worked out."""
    if config.fixed_cut is not None:
        return cut_named(job, config.fixed_cut)
    options = cuts(job)
    for option in options:
        keys = calibration.cuts.get(option_id(job, option))
        seconds = [calibration.seconds.get(k, math.inf) for k in keys or ()]
        if seconds and max(seconds) <= budget_s:
            return option
    return options[-1]


def fill(
    config: SchedulerConfig, runner: MicroStepRunner, job: FineTuneJob, spent: float = 0.0
) -> bool:
    """Dispatches ``job``'s micro-steps while their calibrated times fit what ``spent``
    (calibrated seconds already dispatched in this iteration) left of the budget; returns
    whether it dispatched any."""
    calibration = runner.calibration
    whole = budget(config, calibration)
    granularity = _cut_within(config, calibration, job, whole)
    seconds_left, ran = whole - spent, False
    while not job.done:
        micro = job.next_micro_step(granularity)
        if micro is None:
            break
        seconds = calibration.seconds.get(program_key(job, micro.key))
        if seconds is None or seconds > seconds_left:
            break
        runner.dispatch(job, micro, seconds)
        seconds_left -= seconds
        ran = True
    return ran  # the last programs stay in flight, as harli's do


def fits(config: SchedulerConfig, calibration: Calibration, key: str) -> float | None:
    """The calibrated seconds of program ``key`` if they fit a whole budget (None: they do not,
    or it was never calibrated): what the first micro-step of an iteration is charged."""
    seconds = calibration.seconds.get(key)
    return seconds if seconds is not None and seconds <= budget(config, calibration) else None
