"""Running a fine-tune job's micro-steps on the device, and learning what each took.

This module owns :class:`MicroStepRunner`, the scheduler's hands: it dispatches micro-steps one
ahead of the host (:class:`~harli_jax.sched.inflight.InFlight`), feeds each program's seconds to
the predictor, runs whole cuts, and calibrates a job (every cut compiled, then measured once more)
into a :class:`~harli_jax.sched.calibration.Calibration`. What to run, and when, is the
scheduler's.

A program's first run in a job compiles it (or loads it from the persistent compilation cache):
that run is not a latency sample. Train programs are keyed by the job's LoRA shape (rank, target
modules, rows x seq_len) as well as by the micro-step, so jobs of different shapes never share a
correction.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Iterator

from harli_jax.engine.finetune import FineTuneJob, Granularity, granularities
from harli_jax.lora.train import MicroStep
from harli_jax.sched.calibration import Calibration, job_shape, option_id, train_key
from harli_jax.sched.inflight import InFlight
from harli_jax.sched.predictor import Predictor

# The programs each job has run at least once in this process: a first run compiles.
_WARM: weakref.WeakKeyDictionary[FineTuneJob, set[str]] = weakref.WeakKeyDictionary()


def cuts(job: FineTuneJob) -> list[Granularity]:
    """The ways ``job``'s step can be cut, coarsest first."""
    return granularities(job.trainer.num_layers, job.config.batch_size)


def cut_name(option: Granularity) -> str:
    """A cut's short name: its token chunks x its layer spans, e.g. ``2x22``."""
    chunks, spans = option
    return f"{chunks}x{len(spans)}"


def cut_named(job: FineTuneJob, name: str) -> Granularity:
    """The cut of ``job``'s step called ``name`` (see :func:`cut_name`)."""
    options = {cut_name(option): option for option in cuts(job)}
    if name not in options:
        raise ValueError(f"no cut {name!r} for this job; its cuts are {', '.join(options)}")
    return options[name]


def program_key(job: FineTuneJob, micro_key: tuple) -> str:
    """The predictor's key of ``job``'s program for the micro-step ``micro_key``."""
    return train_key(job_shape(job), micro_key)


def fuse_counts(fuse_spans: int) -> list[int]:
    """How many micro-steps a fused dispatch may run, largest first: the powers of two from 2
    up to ``fuse_spans``."""
    counts, count = [], 2
    while count <= fuse_spans:
        counts.append(count)
        count *= 2
    return counts[::-1]


def family(micro_key: tuple) -> str:
    """The predictor family of a micro-step's program: ``train/<kind>``."""
    return f"train/{micro_key[0]}"


def _steps(job: FineTuneJob, option: Granularity, fuse: int) -> Iterator[MicroStep]:
    """The micro-steps that complete ``job``'s open step (or a new one cut as ``option``), each
    yielded once the one before has been dispatched; ``fuse`` forwards or backwards a program
    wherever they fuse (`FineTuneJob.fused_micro_step`)."""
    while True:
        micro = job.next_micro_step(option)
        if micro is None:
            return
        if fuse > 1:
            micro = job.fused_micro_step(fuse) or micro
        yield micro
        if not job.in_step:
            return


class MicroStepRunner:
    """Dispatches micro-steps and learns their times (``calibration``: what `calibrate` found);
    ``on_tokens`` receives the tokens of every step a micro-step completes, ``on_program`` each
    program's dispatch time, family and seconds (None: not known) once it has run; ``depth``
    programs at most are in flight (`InFlight`)."""

    def __init__(
        self,
        predictor: Predictor,
        calibration: Calibration,
        on_tokens: Callable[[int], None] = lambda tokens: None,
        on_program: Callable[[float, str, float | None], None] = lambda *program: None,
        *,
        depth: int,
    ):
        self.predictor, self.calibration, self.on_tokens = predictor, calibration, on_tokens
        self.on_program = on_program
        self.inflight = InFlight(depth)  # micro-steps dispatched and not yet seen to end

    def dispatch(self, job: FineTuneJob, micro: MicroStep, estimate: float = 0.0) -> None:
        """Dispatches ``micro`` behind the programs in flight (``estimate``: its predicted
        seconds, for planning what follows); once it has run, its time goes to the predictor."""
        finish = job.finish_step if micro.kind == "update" else None
        dispatched = time.perf_counter()
        record = functools.partial(self._record, job, micro.key, dispatched)
        self.inflight.add(job.start(micro), dispatched, estimate, record, finish)

    def run(self, job: FineTuneJob, micro: MicroStep) -> float:
        """Runs one micro-step to its end (after those in flight); returns its wall seconds,
        dispatch and bookkeeping included (what ``static``'s budget is charged)."""
        start = time.perf_counter()
        self.dispatch(job, micro)
        self.inflight.drain()
        return time.perf_counter() - start

    def run_step(
        self, job: FineTuneJob, option: Granularity, fuse: int = 1
    ) -> list[tuple[str, float]]:
        """Runs micro-steps, each to its end, until the open step (or a new one cut as
        ``option``) completes, ``fuse`` forwards or backwards a program wherever they fuse;
        returns (program key, seconds) of each, in order."""
        return [(program_key(job, m.key), self.run(job, m)) for m in _steps(job, option, fuse)]

    def complete_step(self, job: FineTuneJob, option: Granularity) -> bool:
        """Completes the open step (or a new one cut as ``option``) as `run_step` does, but
        with ``depth`` programs queued on the device instead of one, then waits for them: no
        program's time is its own wall time, and the device does not wait for the host between
        programs. Returns whether any ran (a new step may find no arena pages)."""
        ran = False
        for micro in _steps(job, option, fuse=1):
            self.dispatch(job, micro)
            ran = True
        self.inflight.drain()
        return ran

    def _record(
        self,
        job: FineTuneJob,
        micro_key: tuple,
        dispatched: float,
        seconds: float | None,
        finish_s: float,
        metrics,
    ):
        """Learns from a micro-step dispatched at ``dispatched`` that has run: ``seconds`` of its
        program (None: not known), then ``finish_s`` of its step's bookkeeping (an update's:
        0.5 ms on the H100's host, which delays decode as much as a program does). A step that
        wrote a checkpoint feeds its program's seconds alone: its save (2-4 ms on a CPU) comes
        every ``checkpoint_every`` steps, not with the program."""
        key = program_key(job, micro_key)
        warm = _WARM.setdefault(job, set())
        if key not in self.predictor:
            self.predictor.register(key, family(micro_key), job.program_cost(micro_key))
        elif key in warm and seconds is not None:
            checkpointed = metrics and metrics["checkpointed"]
            self.predictor.observe(key, seconds if checkpointed else seconds + finish_s)
        # else: the job's first run of a known program compiled it: not a latency sample
        warm.add(key)
        self.on_program(dispatched, family(micro_key), seconds)
        if metrics is not None:
            self.on_tokens(metrics["tokens"])

    def calibrate(self, job: FineTuneJob, measure: bool = True, fuse_spans: int = 1) -> None:
        """Compiles every cut of ``job``'s train step (one real step at each) and, with
        ``measure``, runs each once more, so that each program has a measured, compile-free run
        for the predictor and a calibrated time for ``static``. Records each cut's micro-steps.
        With ``fuse_spans``, also runs a step of every one-chunk cut for each fused count
        (`fuse_counts`), fusing wherever it can, so that fused programs are known too."""
        job.abandon()  # a step left open by an earlier run would hide the cuts' own programs
        if job.whole_step_fits():  # compiles the idle loop's one-program step
            # and runs it: a first run is slow after compiling too (170 against 30 ms on a
            # 2-core CPU), which would hold the first requests and mislead the fill gate.
            job.train_step()
        for measuring in (False, True) if measure else (False,):
            for option in cuts(job):
                ran = self.run_step(job, option)
                self.calibration.cuts[option_id(job, option)] = [key for key, _ in ran]
                for key, seconds in ran if measuring else ():
                    known = self.calibration.seconds.get(key, 0.0)
                    self.calibration.seconds[key] = max(known, seconds)
            for option in (o for o in cuts(job) if o[0] == 1):
                for count in fuse_counts(fuse_spans):
                    self.run_step(job, option, fuse=count)

    def is_warm(self, job: FineTuneJob) -> bool:
        """Whether every program of every calibrated cut of ``job`` has run in it already."""
        keys = [self.calibration.cuts.get(option_id(job, option)) for option in cuts(job)]
        warm = _WARM.get(job, set())
        return all(k is not None and set(k) <= warm for k in keys)
