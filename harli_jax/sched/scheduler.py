"""The co-location scheduler: after every inference step, decide how much fine-tune work fits
before the next token is due, and run it.

The decode loop emits one token per running request per iteration, so an iteration's length is a
TPOT sample: the inference step plus whatever fine-tune work follows it. ``harli`` (ours, after
the paper) predicts the next inference step with the two-stage predictor, leaves the rest of the
TPOT SLO (less a safety margin that tracks the predictor's observed error) to fine-tuning, and
fills it greedily with micro-steps whose predicted time still fits; it cuts each train step as
coarsely as the slack it usually sees allows, since coarser micro-steps waste less. The baselines
share all the machinery and differ only in that decision:

- ``serve-only``: no fine-tuning at all;
- ``naive``: a whole train step after every inference step, no prediction;
- ``static``: a fixed fine-tune budget per iteration (``static_budget_s`` of micro-steps, counted
  by their measured times, at a fixed granularity), as FlexLLM's token budget does;
- ``harli``: as above.

With no inference work at all, every policy but ``serve-only`` trains in whole steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from harli_jax.engine.finetune import FineTuneJob, Granularity, granularities
from harli_jax.engine.metrics import EngineMetrics
from harli_jax.sched.costs import StepReport
from harli_jax.sched.predictor import Predictor

POLICIES = ("serve-only", "naive", "static", "harli")
# Stage 2 fits one correction per family: inference steps, and each kind of train micro-step
# (a forward span, a backward span, the loss head, the optimiser update differ in shape).
FAMILIES = ("inference", "train/fwd", "train/bwd", "train/head", "train/update")


@dataclasses.dataclass
class SchedulerConfig:
    policy: str = "harli"
    tpot_slo_s: float = 0.05
    static_budget_s: float = 0.0  # for "static": fine-tune seconds per iteration
    static_granularity: int = -1  # index into granularities(); -1: the finest
    min_margin: float = 1.05  # never plan closer than this to the SLO
    loop_overhead_s: float = 0.0005  # host time between steps the predictor does not see

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.tpot_slo_s <= 0:
            raise ValueError(f"the TPOT SLO must be positive, got {self.tpot_slo_s}")


class ColocationScheduler:
    """Implements the engine loop's ``Colocator``: runs fine-tune jobs in inference slack."""

    def __init__(self, config: SchedulerConfig, predictor: Predictor, metrics: EngineMetrics):
        self.config = config
        self.predictor = predictor
        self.metrics = metrics
        self.jobs: deque[FineTuneJob] = deque()
        self._slack = deque(maxlen=64)  # recent fine-tune budgets, for choosing granularity
        self._option_keys: dict[tuple, set[tuple]] = {}  # the programs each cut runs
        self.on_job_done = lambda job: None  # the engine hands the adapter to serving
        self.on_job_failed = lambda job, error: None

    def predictor_errors(self) -> dict[str, dict[str, float]]:
        return {family: self.predictor.error_stats(family) for family in FAMILIES}

    def add_job(self, job: FineTuneJob) -> None:
        self.jobs.append(job)

    # -- the loop's hook ------------------------------------------------------------------------
    def after_step(self, report: StepReport | None) -> bool:
        """Runs fine-tune work after an inference step (``report``; None if the loop was idle).
        Returns whether it ran any."""
        if report is not None:
            self.observe_inference(report)
        if self.config.policy == "serve-only" or not self.jobs:
            return False
        job = self.jobs[0]
        try:
            ran = self._advance(job, report)
        except Exception as error:  # a broken job must not take serving down with it
            self.jobs.popleft()
            self.on_job_failed(job, error)
            return True
        if job.done:
            self.jobs.popleft()
            self.on_job_done(job)
        return ran

    def _advance(self, job: FineTuneJob, report: StepReport | None) -> bool:
        if report is None or self.config.policy == "naive":
            return self._run_whole_step(job)
        if self.config.policy == "static":
            granularity = self._static_granularity(job)
            return self._fill(job, self.config.static_budget_s, granularity, predicted=False)
        budget = self._harli_budget(report)
        self._slack.append(budget)
        return self._fill(job, budget, self._harli_granularity(job), predicted=True)

    # -- decisions --------------------------------------------------------------------------
    def _harli_budget(self, report: StepReport) -> float:
        """The SLO minus the predicted next inference step (with margin) and loop overhead."""
        margin = max(self.config.min_margin, self.predictor.quantile_margin("inference", 0.99))
        next_step = self.predictor.predict(report.key, **report.features) * margin
        return self.config.tpot_slo_s - next_step - self.config.loop_overhead_s

    def _options(self, job: FineTuneJob) -> list[Granularity]:
        return granularities(job.trainer.num_layers, job.config.batch_size)

    def _static_granularity(self, job: FineTuneJob) -> Granularity:
        return self._options(job)[self.config.static_granularity]

    def _harli_granularity(self, job: FineTuneJob) -> Granularity:
        """The coarsest cut whose largest micro-step fits the median recent budget."""
        options = self._options(job)
        if not self._slack:
            return options[-1]
        typical = sorted(self._slack)[len(self._slack) // 2]
        for option in options:
            if self._largest_micro_step(job, option) <= typical:
                return option
        return options[-1]

    def _largest_micro_step(self, job: FineTuneJob, option: Granularity) -> float:
        """The predicted time of the longest micro-step of a step cut as ``option`` (infinite
        for a cut not yet calibrated)."""
        keys = self._option_keys.get(_option_id(job, option))
        if not keys:
            return float("inf")
        return max(self._predict_train(job, key) or float("inf") for key in keys)

    # -- running ----------------------------------------------------------------------------
    def _fill(self, job: FineTuneJob, budget: float, granularity: Granularity, predicted: bool):
        ran = False
        while budget > 0 and not job.done:
            micro = job.next_micro_step(granularity)
            family = _family(micro.key)
            margin = max(self.config.min_margin, self.predictor.quantile_margin(family, 0.99))
            estimate = self._predict_train(job, micro.key)
            if predicted and (estimate is None or estimate * margin > budget):
                # Unknown programs are measured once when there is time to spare (idle loop).
                break
            budget -= self.run_micro_step(job, micro)
            ran = True
        return ran

    def _run_whole_step(self, job: FineTuneJob) -> bool:
        """Finishes the open step (whatever its cut) or runs a new one uncut."""
        self._run_step(job, self._options(job)[0])
        return True

    def _run_step(self, job: FineTuneJob, option: Granularity) -> set[tuple]:
        """Runs micro-steps until the open step (or a new one cut as ``option``) completes;
        returns the program keys it ran."""
        keys = set()
        while True:
            micro = job.next_micro_step(option)
            keys.add(micro.key)
            self.run_micro_step(job, micro)
            if not job.in_step:
                return keys

    def run_micro_step(self, job: FineTuneJob, micro) -> float:
        """Runs one micro-step, feeds its program's time to the predictor; returns the wall
        seconds it took (bookkeeping and checkpoint writes included: they delay decode too)."""
        start = time.perf_counter()
        program_seconds, metrics = job.run(micro)
        seconds = time.perf_counter() - start
        key = _key(micro.key)
        if key in self.predictor:
            self.predictor.observe(key, program_seconds)
        else:  # the first run compiled the program: register it, but do not learn from it
            self.predictor.register(key, _family(micro.key), job.program_cost(micro.key))
        if metrics is not None:
            self.metrics.on_finetune_tokens(metrics["tokens"])
        return seconds

    def calibrate(self, job: FineTuneJob) -> None:
        """Compiles and measures every cut of ``job``'s train step (one real step at each, then
        one more so that each program has a measured, compile-free run)."""
        for option in [*self._options(job), *self._options(job)]:
            keys = self._run_step(job, option)
            self._option_keys.setdefault(_option_id(job, option), set()).update(keys)

    # -- predictor plumbing -----------------------------------------------------------------
    def observe_inference(self, report: StepReport) -> None:
        if report.key in self.predictor:
            self.predictor.observe(report.key, report.seconds, **report.features)
        else:  # first sighting: its time includes compilation
            self.predictor.register(report.key, "inference", report.cost)

    def _predict_train(self, job: FineTuneJob, program_key: tuple) -> float | None:
        key = _key(program_key)
        return self.predictor.predict(key) if key in self.predictor else None


def _option_id(job: FineTuneJob, option: Granularity) -> tuple:
    shape = (job.config.lora, job.config.batch_size, job.config.seq_len)
    return (shape, option[0], tuple(option[1]))


def _family(program_key: tuple) -> str:
    return f"train/{program_key[0]}"


def _key(program_key: tuple) -> str:
    return "train/" + "/".join(str(part) for part in program_key)
