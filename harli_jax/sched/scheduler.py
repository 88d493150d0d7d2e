"""The co-location scheduler: after every inference step, decide how much fine-tune work fits
before the next token is due, and run it.

The decode loop emits one token per running request per iteration, so an iteration's length is a
TPOT sample: the inference step plus whatever fine-tune work follows it. ``harli`` (ours, after
the paper) predicts the next inference step with the two-stage predictor, leaves the rest of the
TPOT SLO to fine-tuning, and fills it greedily with micro-steps whose predicted time still fits.

Each prediction carries a margin (:mod:`harli_jax.sched.pricing`).
:class:`~harli_jax.sched.backoff.SloBackoff` then takes off what keeps 99.5% of
iterations within the SLO, counting only the overruns fine-tune work made; its target is above
the SLO's 99% of tokens because the overruns it cannot count (the inference step alone outlasting
the SLO, as right after fine-tune work it often ran slow) still cost tokens.

Requests that arrive during fine-tune work join after the next step (the engine loop drains its
inbox between a step and the work after it), so the next step's programs are known when its slack is
planned: decode as the step just run, plus a prefill chunk priced as the slowest recent step that
ran one. Every few train steps it picks the cut that finishes a step in the fewest iterations when
its predicted micro-steps are packed, in order, into the time fine-tuning was left in the recent
iterations (:mod:`harli_jax.sched.cut_choice`); it starts each train step (the cut, the pages, the
plan) while the device runs the inference step before a fill, off the fine-tune budget, and the
fill that completes a step leaves room for that start's overrun of the inference step
(:mod:`harli_jax.sched.step_starts`). A step whose next micro-step has not fitted for several
iterations in a row (the load rose after it was cut) is dropped and its batch cut again.
Where decode leaves enough idle time, training whole steps only there trains more than filling
iterations, which stretches requests over that idle time:
:class:`~harli_jax.sched.fill_gate.FillGate` decides which. While the job's checkpoint is written
in the background, harli fills nothing, and a fill in which one starts (its step's update ran)
stops there: on a 2-core CPU the write slowed every program ~2.5x for ~80 ms, past any margin
the predictor keeps (on a GPU's host it contends for the GIL instead).
The baselines share all the machinery and differ only in that decision:

- ``serve-only``: no fine-tuning at all;
- ``naive``: a whole train step after every inference step, no prediction;
- ``static``: a fixed fine-tune budget per iteration, chosen once, offline, so that it meets the
  SLO, as FlexLLM's token budget is tuned: ``static_budget_s`` if given, else the SLO minus the
  p99 decode step measured at calibration (steps that also prefill left out: a budget tuned to
  the rare long iteration would leave every other one idle) minus the loop overhead. Its cut is
  fixed too (the coarsest whose slowest calibrated micro-step fits the budget, else the finest),
  and it runs a micro-step only if its *calibrated* time fits what is left of the budget: no
  prediction, no online correction, never adapted to the load. A budget too large for the SLO
  would make it a straw man; this one is the best a fixed budget can promise without knowing
  the load (:mod:`harli_jax.sched.static`);
- ``harli``: as above.

With no inference work at all, every policy but ``serve-only`` trains in whole steps. Micro-steps
run through a :class:`~harli_jax.sched.runner.MicroStepRunner`, which keeps the next ones queued on
the device (``inflight_depth - 1`` of them) while the host prepares the one after; ``static`` and
``harli`` queue a fill's first micro-step behind the inference step while it runs, where it fits.
An inference program's first step under a scheduler may compile, so it is not a latency sample.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np

from harli_jax.engine.finetune import FineTuneJob, Granularity
from harli_jax.engine.metrics import EngineMetrics
from harli_jax.lora.train import MicroStep
from harli_jax.sched import pricing, static
from harli_jax.sched.backoff import SloBackoff, miss_cause
from harli_jax.sched.calibration import Calibration
from harli_jax.sched.config import SchedulerConfig
from harli_jax.sched.costs import StepReport
from harli_jax.sched.cut_choice import fewest_iterations
from harli_jax.sched.fill_gate import FillGate
from harli_jax.sched.inference_steps import InferenceSteps
from harli_jax.sched.predictor import Predictor
from harli_jax.sched.runner import (
    MicroStepRunner,
    cut_named,
    cuts,
    family,
    fuse_counts,
    program_key,
)
from harli_jax.sched.step_starts import StepStarts

_STALL_LIMIT = 8  # iterations an open step may wait for a micro-step to fit
# Stage 2 fits one correction per family: inference steps, and each kind of train micro-step
# (a forward span, a backward span, the loss head, the optimiser update differ in shape).
FAMILIES = ("inference", "train/fwd", "train/bwd", "train/head", "train/update")


class _Fill(NamedTuple):
    """One of harli's fills, as the next step's end judges its iteration: when the step before
    it ended, when it began, the deadline it aimed its programs at, when its host loop returned,
    and whether it dispatched any program (``time.perf_counter`` times)."""

    step_ended: float
    start: float
    deadline: float
    returned: float
    dispatched: bool


class ColocationScheduler:
    """Implements the engine loop's ``Colocator``: runs fine-tune jobs in inference slack."""

    def __init__(
        self,
        config: SchedulerConfig,
        predictor: Predictor,
        metrics: EngineMetrics,
        calibration: Calibration | None = None,
    ):
        self.config = config
        self.predictor = predictor
        self.metrics = metrics
        self.jobs: deque[FineTuneJob] = deque()
        self._slack = deque(maxlen=64)  # recent fine-tune budgets, for choosing granularity
        # Tokens and programs go to the metrics of the moment: a run swaps in its own.
        self.runner = MicroStepRunner(
            predictor,
            calibration or Calibration(),
            on_tokens=lambda tokens: self.metrics.on_finetune_tokens(tokens),
            on_program=lambda *program: self.metrics.on_program(*program),
            depth=config.inflight_depth,
        )
        self.inference = InferenceSteps(predictor)
        self.starts = StepStarts(self._harli_granularity)
        # The seconds charged to the next fill by a micro-step queued behind the running
        # inference step (None: none was).
        self._queued_behind: float | None = None
        self._stalls = 0  # iterations in a row in which the open step could not go on
        self.backoff = SloBackoff(config.backoff_target, max_s=config.tpot_slo_s / 2)
        if config.policy == "harli":  # the backoff is harli's alone
            # Where a warm-up left it: learning it from zero costs a few overruns at each start.
            self.backoff.seconds = min(self.calibration.slo_backoff_s, self.backoff.max_s)
        self.gate = FillGate()
        self._last_fill: _Fill | None = None  # until the step after it ends its iteration
        # harli's filled iterations by backoff.miss_cause: on time, or what made them late.
        self.fill_outcomes: collections.Counter[str] = collections.Counter()
        self.on_job_done = lambda job: None  # the engine hands the adapter to serving
        self.on_job_failed = lambda job, error: None

    @property
    def calibration(self) -> Calibration:
        return self.runner.calibration

    @calibration.setter
    def calibration(self, calibration: Calibration) -> None:
        self.runner.calibration = calibration

    def predictor_errors(self) -> dict[str, dict[str, float]]:
        return {family: self.predictor.error_stats(family) for family in FAMILIES}

    def add_job(self, job: FineTuneJob) -> None:
        self.jobs.append(job)

    # -- the loop's hook ------------------------------------------------------------------------
    def after_step(self, report: StepReport | None, prefill_tokens: int = 0) -> bool:
        """Runs fine-tune work after an inference step (``report``; None if the loop is idle)
        before the next (whose prefill chunk runs ``prefill_tokens`` prompt tokens). Returns
        whether it ran any."""
        if report is None:  # no step waited for the programs in flight (it ran none)
            self.drain()
        else:  # one queued behind the step runs on while the fill is planned
            self.runner.inflight.hold_until(report.ended_at)
            # The predictor learns from the step once the fill's first program is queued (or
            # after the fill): its refits and quantiles are host time that would otherwise keep
            # the device idle between the step and the fill (0.45 ms on the H200's host, with
            # the planning). Until then it predicts from the steps before this one.
            self._count_inference(report)
            self.inference.defer(report)
        self.inference.after_train = self._work(report, prefill_tokens)
        self.inference.learn_pending()
        return self.inference.after_train

    def during_step(self, running: jax.Array, last: bool = True) -> float | None:
        """The loop's hook once an inference step's first program is queued (``running`` is
        ready once it has run; ``last``: no program of the step follows it): waits for the
        fine-tune programs queued before it (:meth:`drain`), queues the fill's first micro-step
        behind it (:meth:`_queue_behind`), then harli starts the next train step while the
        device runs the inference step (:class:`~harli_jax.sched.step_starts.StepStarts`). A
        step whose host time carried a start is not an inference latency sample."""
        ended = self.drain()
        # Not while the gate trains whole steps in idle time (a step started now is micro-stepped
        # and an idle loop would finish it at micro-step speed), unless configured to.
        may_queue = self.config.queue_unfilled or self.gate.filling
        if self.config.policy in ("harli", "static") and self.jobs and may_queue:
            job = self.jobs[0]
            if self.config.policy == "harli" and job.checkpoint_writing:
                return ended
            try:
                free_since = time.perf_counter()
                if last and self.config.queue_behind:
                    self._queued_behind = self._queue_behind(job, running)
                if self.config.policy == "harli":
                    carried = self.starts.while_running(job, running, free_since)
                    self.inference.carried_start = self.inference.carried_start or carried
            except Exception as error:  # a broken job must not take serving down with it
                self._fail(job, error)
        return ended

    def _queue_behind(self, job: FineTuneJob, running: jax.Array) -> float | None:
        """Dispatches the open step's next micro-step behind the running inference step, so that
        the device goes from one to the other without waiting for the host: learning, planning
        and the dispatch left it idle ~1 ms of each filled iteration on the H200's host. Only
        while ``running`` has not run (the dispatch must not delay its tokens), never an update
        (its step's bookkeeping waits for it), and only where the micro-step fits: harli's
        estimate the tightest tenth of recent fill budgets, static's calibrated time its
        budget. Returns the seconds it charged the fill (None: it dispatched nothing)."""
        if job.done or not job.in_step or running.is_ready():
            return None
        micro = job.open_micro_step()
        if micro.kind == "update":
            return None
        key = program_key(job, micro.key)
        if self.config.policy == "static":
            seconds = static.fits(self.config, self.calibration, key)
        elif key in self.predictor and len(self._slack) >= 8:
            seconds = self._estimate(micro, key)
            seconds = seconds if seconds <= np.quantile(self._slack, 0.1) else None
        else:
            seconds = None
        if seconds is not None:
            self.runner.dispatch(job, micro, seconds)
            self._stalls = 0
            # Its dispatch outlasted the program: the host saw the step end late.
            self.inference.carried_start = running.is_ready()
        return seconds

    def drain(self) -> float | None:
        """Waits for the fine-tune programs left queued on the device (the loop's next step
        calls this once its own first program is queued behind them); returns when the host
        saw the last one end (None: none was queued). A job whose program fails is dropped."""
        try:
            return self.runner.inflight.drain(late=True)
        except Exception as error:  # a broken job must not take serving down with it
            self._fail(self.jobs[0], error)
            return None

    def _work(self, report: StepReport | None, prefill_tokens: int) -> bool:
        """Advances the first job as the policy says; a job that raises is failed and dropped,
        one that finishes is handed on. Returns whether fine-tune work ran."""
        if self.config.policy == "serve-only" or not self.jobs:
            return False
        job = self.jobs[0]
        try:
            ran = self._advance(job, report, prefill_tokens)
        except Exception as error:  # a broken job must not take serving down with it
            self._fail(job, error)
            return True
        if job.done:
            self.jobs.popleft()
            self.on_job_done(job)
        return ran

    def _fail(self, job: FineTuneJob, error: Exception) -> None:
        self.runner.inflight.clear()
        self.jobs.remove(job)
        self.on_job_failed(job, error)

    def _advance(self, job: FineTuneJob, report: StepReport | None, prefill_tokens: int) -> bool:
        queued, self._queued_behind = self._queued_behind, None
        if report is None or self.config.policy == "naive":
            self._last_fill = None
            return self._run_whole_step(job)
        if self.config.policy == "static":
            return static.fill(self.config, self.runner, job, queued or 0.0) or queued is not None
        if self._last_fill is not None:
            self._learn_from(self._last_fill, report)
            self._last_fill = None
        if not self.gate.should_fill() or job.checkpoint_writing:
            return queued is not None
        # The next token is due one SLO after this step's: the host time since (the inbox,
        # learning from the step) comes out of the budget too.
        budget = pricing.fill_budget(
            self.config, self.predictor, report, prefill_tokens, self.inference.prefill_steps
        )
        deadline = report.ended_at + budget
        deadline -= self.backoff.seconds
        # Cuts are chosen for the time fine-tuning actually gets: a cut chosen for the nominal
        # budget had micro-steps that never fitted what was left of it, and stalled its step.
        # A micro-step queued behind the step has had the device since the step ended.
        start = report.ended_at if queued is not None else time.perf_counter()
        self._slack.append(deadline - start)
        ran = self._fill(job, deadline, queued is not None)
        self._last_fill = _Fill(report.ended_at, start, deadline, time.perf_counter(), ran)
        return ran

    def _learn_from(self, fill: _Fill, report: StepReport) -> None:
        """Learns from the iteration of harli's last fill, which ``report``'s step ended: counts
        its outcome and, if the fill ran fine-tune work, feeds the backoff and the fill gate."""
        slo_s, ended = self.config.tpot_slo_s, report.ended_at
        programs_ended = self.runner.inflight.last_end if fill.dispatched else -math.inf
        times = (fill.step_ended, fill.deadline, fill.returned, programs_ended, ended)
        self.fill_outcomes[miss_cause(slo_s, *times)] += 1
        if fill.dispatched:
            iteration_s = ended - fill.step_ended
            self.backoff.observe(iteration_s, slo_s, programs_ended - fill.start)
            self.gate.on_filled_iteration(iteration_s)

    # -- decisions --------------------------------------------------------------------------
    def _harli_granularity(self, job: FineTuneJob) -> Granularity:
        """The cut that completes a step in the fewest recent budgets (see
        :func:`~harli_jax.sched.cut_choice.fewest_iterations`)."""
        if self.config.fixed_cut is not None:
            return cut_named(job, self.config.fixed_cut)
        options = cuts(job)
        planned = functools.partial(
            pricing.planned, self.config, self.predictor, self.calibration, job
        )
        return fewest_iterations(options, planned, list(self._slack))

    # -- running ----------------------------------------------------------------------------
    def _fill(self, job: FineTuneJob, deadline: float, queued: bool = False) -> bool:
        """Dispatches micro-steps while the next one's estimate fits before ``deadline`` (a
        ``time.perf_counter`` time) behind those in flight (``queued``: one was queued behind
        the inference step): planning a step, predicting and learning take host time between
        programs, which the programs in flight hide but which a budget must still leave room
        for (on the H100, harli's median iteration once came out 5 ms over a 19 ms SLO). Each
        new step gets its cut from the budgets as they are then. The last programs are left in
        flight for the next inference step to queue behind (:meth:`drain`). A checkpoint's write,
        which a step completed in the fill may start, ends it. Returns whether it dispatched any."""
        ran = queued
        while not job.done and not job.checkpoint_writing:
            micro = self._next_micro_step(job, deadline)
            if micro is None:  # no time to start a step, or no arena pages for one now
                break
            key = program_key(job, micro.key)
            # Unknown programs are measured once when there is time to spare (idle loop).
            if key not in self.predictor:
                break
            # The step it completes has the next start made alongside the next inference step.
            extra = self.starts.expected_delay() if micro.kind == "update" else 0.0
            start = self.runner.inflight.busy_until() + extra
            fits = (c for c in self._choices(job, micro, key) if start + c[1] <= deadline)
            choice = next(fits, None)
            if choice is None:
                if not ran:
                    self._stalled(job)
                break
            micro, estimate = choice
            tokens = job.tokens_trained
            self.runner.dispatch(job, micro, estimate)
            self.inference.learn_pending()  # while the device runs the first program
            ran, self._stalls = True, 0
            if job.tokens_trained > tokens:  # its update ran: the step is done
                self.gate.on_fill_trained(job.tokens_trained - tokens)
        return ran

    def _choices(
        self, job: FineTuneJob, micro: MicroStep, key: str
    ) -> Iterator[tuple[MicroStep, float]]:
        """What may run next, largest first, each with its estimate: the programs that run
        ``micro`` and the micro-steps after it as one (``fuse_spans`` at most) that the
        predictor knows, then ``micro`` itself (whose program ``key`` it knows)."""
        for count in fuse_counts(self.config.fuse_spans):  # none below 2
            fused = job.fused_micro_step(count)
            fused_key = None if fused is None else program_key(job, fused.key)
            if fused_key is not None and fused_key in self.predictor:
                yield fused, self._estimate(fused, fused_key)
        yield micro, self._estimate(micro, key)

    def _estimate(self, micro: MicroStep, key: str) -> float:
        """``micro``'s predicted seconds with its margin; ``key`` is its program's."""
        return pricing.estimate(self.config, self.predictor, family(micro.key), key)

    def _stalled(self, job: FineTuneJob) -> None:
        """Counts an iteration in which the open step's next micro-step did not fit; after
        ``_STALL_LIMIT`` in a row the step was cut for budgets the load no longer leaves (a
        cut is never changed mid-step), so it is dropped and its batch cut again."""
        self._stalls += 1
        if self._stalls >= _STALL_LIMIT and job.in_step:
            job.abandon()
            self._stalls, self.starts.cut = 0, None
            self.metrics.on_finetune_abandoned()

    def _next_micro_step(self, job: FineTuneJob, deadline: float) -> MicroStep | None:
        """The open step's next micro-step; or, if a start fits before ``deadline``, the first
        of a new step (the inference step before did not leave one started)."""
        if job.in_step:
            return job.open_micro_step()
        return self.starts.before(job, deadline)

    def _run_whole_step(self, job: FineTuneJob) -> bool:
        """Finishes the open step (whatever its cut) or runs a new one as one program (as the
        whole cut in arena pages where that does not fit); False if nothing ran (no arena pages
        for a new step), so an idle loop waits rather than spins."""
        if job.in_step or not job.whole_step_fits():
            return self.runner.complete_step(job, cuts(job)[0])
        start = time.perf_counter()
        tokens = job.train_step()["tokens"]
        self.metrics.on_finetune_tokens(tokens)
        seconds = time.perf_counter() - start
        self.metrics.on_program(start, "train/whole", seconds)
        self.gate.on_whole_step(tokens, seconds)
        return True

    # -- predictor plumbing -----------------------------------------------------------------
    def observe_inference(self, report: StepReport, calibrating: bool = False) -> None:
        """Learns from an inference step (``calibrating``: also keeps it for ``static``)."""
        if not calibrating:
            self._count_inference(report)
        learn = self.inference.note(report, self.calibration if calibrating else None)
        if learn is not None:
            learn()

    def _count_inference(self, report: StepReport) -> None:
        """Counts a served inference step in the fill gate's demand and the metrics."""
        self.gate.on_inference(report.features["rows"], report.seconds)
        self.metrics.on_program(report.ended_at - report.seconds, "inference", report.seconds)
