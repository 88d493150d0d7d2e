"""When harli starts a fine-tune job's next train step, and with which cut.

Starting a step is host work: choosing its cut (pricing every cut: ~2.5 ms on the H100's host, so
a choice is kept for a few steps), then leasing its arena pages, moving its batch and planning its
micro-steps (~3 ms on that host, some starts 9-14 ms). Done inside a fill, it comes out of the
fine-tune budget, and a slow one cost a token its SLO. So :class:`StepStarts` starts the next step
while the device runs the inference step before the fill, when the host only waits for it
(:meth:`StepStarts.while_running`): the cut, then, if that program has still not run, the plan.
The host is free there for only ~1.2 ms on the H100 at heavy load, so a start outlasts the
inference step by the rest; the fill that completes a step leaves that room
(:meth:`StepStarts.expected_delay`). A plan the inference step leaves no time for is made by the
next fill, if its median time fits before the fill's deadline (:meth:`StepStarts.before`).
"""

from __future__ import annotations

import collections
import time
from collections import deque
from collections.abc import Callable

import jax
import numpy as np

from harli_jax.engine.device_wait import wait_until_ready
from harli_jax.engine.finetune import FineTuneJob, Granularity
from harli_jax.lora.train import MicroStep
from harli_jax.sched.runner import cut_name

RECUT_EVERY = 4  # step starts that reuse a choice of cut
GATED_LIMIT = 8  # fills in a row a start may wait for before its oldest records are dropped
# The share of inference steps that leave the host less free time than `expected_delay` assumes.
FREE_QUANTILE = 0.25


class StepStarts:
    """Starts ``job``'s steps, each cut as ``choose_cut(job)`` decides every few steps."""

    def __init__(self, choose_cut: Callable[[FineTuneJob], Granularity]) -> None:
        self._choose_cut = choose_cut
        self.cut: Granularity | None = None  # the kept choice (None: choose at the next start)
        self._cut_uses = 0
        # Recent host seconds: of choosing a cut, of leasing and planning a step, and of the
        # time the host waited for an inference step's first program when it had nothing to start.
        self._cut_s: deque[float] = deque(maxlen=16)
        self._plan_s: deque[float] = deque(maxlen=16)
        self._free_s: deque[float] = deque(maxlen=64)
        self._gated = 0  # fills in a row too short for a start
        # Where starts were made ("while running", "in a fill"), and the inference steps that
        # ran out after the cut was chosen ("plan left to the fill").
        self.made: collections.Counter[str] = collections.Counter()
        self.steps_by_cut: collections.Counter[str] = collections.Counter()  # e.g. "2x22"

    @property
    def _cut_due(self) -> bool:
        return self.cut is None or self._cut_uses >= RECUT_EVERY

    def while_running(
        self, job: FineTuneJob, running: jax.Array, free_since: float | None = None
    ) -> bool:
        """Starts ``job``'s next step while ``running`` (the inference step's program) runs: the
        cut if one is due, then, if ``running`` has still not run, the lease and plan. Returns
        whether it did any of that host work, which may outlast ``running`` and so delay the
        inference step's results (:meth:`expected_delay`). With nothing to start, waits for
        ``running`` and records how long the host was free, from ``free_since`` if given (the
        host's own work since then, a dispatch, would have made way for a start)."""
        begun = time.perf_counter() if free_since is None else free_since
        if job.done or job.in_step:
            wait_until_ready(running)
            self._free_s.append(time.perf_counter() - begun)
            return False
        if running.is_ready():
            return False
        if self._cut_due:
            self._new_cut(job)
            if running.is_ready():
                self.made["plan left to the fill"] += 1
                return True
        self._start(job)
        self.made["while running"] += 1
        return True

    def expected_delay(self) -> float:
        """Seconds by which the next start is expected to outlast the inference step it runs
        alongside: its median cut (if one is due) and plan, less the host's usual free time
        there (``FREE_QUANTILE`` of it). A fill that completes a step leaves this room."""
        return max(0.0, self._cost() - (self._free() or 0.0))

    def before(self, job: FineTuneJob, deadline: float) -> MicroStep | None:
        """Starts ``job``'s next step in a fill if the median recent start fits before
        ``deadline`` (a ``time.perf_counter`` time); its first micro-step (None: no time, or
        no arena pages now).

        The median, not the slowest: one slow start (55 ms on the H100's host) kept every later
        one waiting for a budget that large. And while starts wait, no new sample comes to
        replace the slow ones, so after a few fills the oldest is dropped: a run's first start
        (11 ms with its first lease, against ~9 ms budgets) blocked all others."""
        start = time.perf_counter()
        if self._cost() > deadline - start:
            self._gated += 1
            if self._gated >= GATED_LIMIT:
                for record in (self._cut_s, self._plan_s):
                    if record:
                        record.popleft()
                self._gated = 0
            return None
        self._gated = 0
        if self._cut_due:
            self._new_cut(job)
        self.made["in a fill"] += 1
        return self._start(job)

    def _cost(self) -> float:
        """The median host seconds of the next start: its cut, if one is due, and its plan."""
        return _median(self._plan_s) + (_median(self._cut_s) if self._cut_due else 0.0)

    def _free(self) -> float | None:
        """The host's usual free seconds during an inference step (None before any record)."""
        return float(np.quantile(self._free_s, FREE_QUANTILE)) if self._free_s else None

    def summary(self) -> dict[str, float | None]:
        """Where starts were made (counts), and the recent host times they were priced at (ms)."""
        free = self._free()
        times = dict(cut_ms=_median(self._cut_s) * 1e3, plan_ms=_median(self._plan_s) * 1e3)
        free_ms = None if free is None else free * 1e3
        return {**self.made, **times, "free_ms": free_ms, "steps_by_cut": dict(self.steps_by_cut)}

    def _new_cut(self, job: FineTuneJob) -> None:
        start = time.perf_counter()
        self.cut, self._cut_uses = self._choose_cut(job), 0
        self._cut_s.append(time.perf_counter() - start)

    def _start(self, job: FineTuneJob) -> MicroStep | None:
        """Leases the step's pages and plans it with the kept cut; records its host seconds."""
        start = time.perf_counter()
        self._cut_uses += 1
        micro = job.next_micro_step(self.cut)
        self._plan_s.append(time.perf_counter() - start)
        if micro is not None:
            self.steps_by_cut[cut_name(self.cut)] += 1
        return micro


def _median(seconds: deque[float]) -> float:
    return float(np.median(seconds)) if seconds else 0.0
