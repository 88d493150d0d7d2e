"""When harli starts a fine-tune job's next train step, and with which cut.

Starting a step is host work: choosing its cut (pricing every cut: 2-3 ms on the H100's host, so
a choice is kept for a few steps), then leasing its arena pages, moving its batch and planning its
micro-steps (all together 3-4 ms on that host, some starts 9-14 ms). Done inside a fill, it comes
out of the fine-tune budget, and a slow one cost a token its SLO. So :class:`StepStarts` starts the
next step while the device runs the inference step before the fill, which leaves the host idle
(:meth:`StepStarts.while_running`), and stops between the cut and the plan once that step has run.
A fill starts a step itself only when that did not happen, and only if a typical start fits
before its deadline (:meth:`StepStarts.before`).
"""

from __future__ import annotations

import collections
import time
from collections import deque
from collections.abc import Callable

import jax
import numpy as np

from harli_jax.engine.finetune import FineTuneJob, Granularity
from harli_jax.lora.train import MicroStep

RECUT_EVERY = 4  # step starts that reuse a choice of cut
GATED_LIMIT = 8  # fills in a row a start may wait for before its slowest record is dropped


class StepStarts:
    """Starts ``job``'s steps, each cut as ``choose_cut(job)`` decides every few steps."""

    def __init__(self, choose_cut: Callable[[FineTuneJob], Granularity]) -> None:
        self._choose_cut = choose_cut
        self.cut: Granularity | None = None  # the kept choice (None: choose at the next start)
        self._cut_uses = 0
        self._start_s: deque[float] = deque(maxlen=16)  # host seconds of recent starts
        self._gated = 0  # fills in a row too short for a start
        # Where starts were made: "while running", "in a fill"; "cut only": stopped between.
        self.made: collections.Counter[str] = collections.Counter()

    def while_running(self, job: FineTuneJob, running: jax.Array) -> None:
        """Starts ``job``'s next step, unless one is open, while ``running`` (the inference
        step's program) has not run: the cut if one is due, then, if it still has not, the rest."""
        if job.done or job.in_step or running.is_ready():
            return
        start = time.perf_counter()
        cut = self._cut_for(job)
        if running.is_ready():
            self.made["cut only"] += 1
            return
        self._start(job, cut, start)
        self.made["while running"] += 1

    def before(self, job: FineTuneJob, deadline: float) -> MicroStep | None:
        """Starts ``job``'s next step in a fill if the median recent start fits before
        ``deadline`` (a ``time.perf_counter`` time); its first micro-step (None: no time, or
        no arena pages now).

        The median, not the slowest: one slow start (55 ms on the H100's host) kept every later
        one waiting for a budget that large. And while starts wait, no new sample comes to
        replace the slow ones, so after a few fills the oldest is dropped: a run's first start
        (11 ms with its first lease, against ~9 ms budgets) blocked all others."""
        start = time.perf_counter()
        if self._start_s and float(np.median(self._start_s)) > deadline - start:
            self._gated += 1
            if self._gated >= GATED_LIMIT:
                self._start_s.popleft()
                self._gated = 0
            return None
        self._gated = 0
        self.made["in a fill"] += 1
        return self._start(job, self._cut_for(job), start)

    def _cut_for(self, job: FineTuneJob) -> Granularity:
        if self.cut is None or self._cut_uses >= RECUT_EVERY:
            self.cut, self._cut_uses = self._choose_cut(job), 0
        return self.cut

    def _start(self, job: FineTuneJob, cut: Granularity, start: float) -> MicroStep | None:
        """Leases the step's pages and plans it; records the host seconds since ``start``."""
        self._cut_uses += 1
        micro = job.next_micro_step(cut)
        self._start_s.append(time.perf_counter() - start)
        return micro
