"""Fine-tune programs dispatched ahead of the device, and the seconds each took.

A micro-step run synchronously leaves the device idle while the host waits for it, then picks,
plans and dispatches the next: on the H100's host that came to ~0.8 ms a program, a quarter of
a two-layer span's run (a 1 x 11 cut's step took 73 ms of wall time for 51 ms of device work).
`InFlight` keeps the next program queued on the device while the host prepares the one after,
and still gives each program a time of its own for the predictor: from when the device could
start it (its dispatch returned, or the previous program ended, whichever came later) to when the
host saw it end. A program that ended while the host was busy elsewhere is seen late, so its time
errs long, toward caution. The dispatch itself (0.7-1 ms of host time for a span on the H100's
host) is timed apart: it delays a program only when nothing is queued ahead of it, so
`busy_until` adds it there, and the predictor's samples are not a mix of programs that paid it
and programs that did not (the first of a fill ran 1.3-1.4x the rest on the H100).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from harli_jax.engine.device_wait import wait_until_ready


@dataclasses.dataclass(frozen=True)
class _Program:
    done: jax.Array  # ready once the program has run
    queued: float  # clock time its dispatch returned: the device may start it from then
    estimate: float  # its predicted seconds, for planning what follows
    finish: Callable[[], Any] | None  # host work due once it has run (a step's update)
    # Receives its seconds (None: not known, see InFlight.drain), the seconds of ``finish``
    # and what ``finish`` returned.
    record: Callable[[float | None, float, Any], None]


class InFlight:
    """The programs dispatched and not yet seen to end, oldest first."""

    def __init__(self, depth: int, clock: Callable[[], float] = time.perf_counter) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.depth, self._clock = depth, clock
        self._programs: deque[_Program] = deque()
        self._last_end = -math.inf
        self._dispatch_s: deque[float] = deque(maxlen=64)  # host seconds of recent dispatches
        self._dispatch_quantile: float | None = None  # dispatch_s, until the next dispatch

    @property
    def dispatch_s(self) -> float:
        """The host seconds a dispatch takes (90th percentile of recent ones; 0 before any)."""
        if self._dispatch_quantile is None:
            recent = self._dispatch_s
            self._dispatch_quantile = float(np.quantile(recent, 0.9)) if recent else 0.0
        return self._dispatch_quantile

    @property
    def last_end(self) -> float:
        """When the host last saw a program end and did its host work (-inf before any)."""
        return self._last_end

    def __len__(self) -> int:
        return len(self._programs)

    def busy_until(self) -> float:
        """When a program dispatched now could start: after what is queued (by the programs'
        estimates) and after its own dispatch, which only a queued program hides."""
        end = self._last_end
        for program in self._programs:
            end = max(end, program.queued) + program.estimate
        return max(end, self._clock() + self.dispatch_s)

    def add(
        self,
        done: jax.Array,
        dispatched: float,
        estimate: float,
        record: Callable[[float | None, float, Any], None],
        finish: Callable[[], Any] | None = None,
    ) -> None:
        """Queues a program whose dispatch began at ``dispatched`` and has just returned; waits
        for the oldest while more than ``depth - 1`` are queued, and for all of them after one
        with ``finish`` (later programs may need it)."""
        queued = self._clock()
        self._dispatch_s.append(queued - dispatched)
        self._dispatch_quantile = None
        self._programs.append(_Program(done, queued, estimate, finish, record))
        while len(self._programs) >= self.depth or (finish is not None and self._programs):
            self._retire()

    def hold_until(self, moment: float) -> None:
        """The programs queued now could not start before ``moment``: they were queued behind an
        inference program the host saw end then. Their times and ``busy_until`` count from it."""
        self._programs = deque(
            dataclasses.replace(program, queued=max(program.queued, moment))
            for program in self._programs
        )

    def drain(self, late: bool = False) -> float | None:
        """Waits for every queued program; returns the clock time the host saw the last one end
        (None if none was queued).

        ``late``: the host comes from other work (the next inference step's dispatch, 1-2 ms on
        the H100's host), so a program it finds ended may have ended long before: its time is
        not known, and it is recorded without one rather than as that long."""
        ended = None
        while self._programs:
            ended = self._retire(late)
        return ended

    def clear(self) -> None:
        """Forgets the queued programs without waiting (their job failed)."""
        self._programs.clear()

    def _retire(self, late: bool = False) -> float:
        """Waits for the oldest program and records it; returns when the host saw it end."""
        program = self._programs.popleft()
        unknown = late and program.done.is_ready()
        wait_until_ready(program.done)
        ended = self._clock()
        seconds = ended - max(program.queued, self._last_end)
        result = program.finish() if program.finish is not None else None
        self._last_end = self._clock()
        program.record(None if unknown else seconds, self._last_end - ended, result)
        return ended
