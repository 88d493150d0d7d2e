"""Whether harli fills decode iterations with fine-tune micro-steps at all.

Filling stretches every iteration toward the SLO, so requests run longer and the loop is idle
less; idle time is where fine-tuning runs whole steps, which train faster than micro-steps (one
cut, no arena round trip per span, no dispatch per span: on the H100, 41k against ~28k tokens/s
for the TinyLlama shape). Where decode leaves much of the time idle, training only there beats
filling; where it leaves little, filling wins. ``FillGate`` decides from a model of the loop fed
with measured rates:

- demand: output tokens per second ``r`` (the requests', whatever the policy) and the mean
  inference step ``t``. By Little's law the mean number of requests running is ``r * t`` when
  each iteration lasts ``t`` (one step per token), and with Poisson arrivals that number is
  Poisson, so the loop is busy ``1 - exp(-r * t)`` of the time: ``busy0`` without filling, with
  ``t`` the inference step (0.39 against 0.34 measured for the H100's light trace), ``busy1``
  when filling, with ``t`` the filled iterations' mean length;
- ``fill``: fine-tune tokens per second of filled iterations' wall time, measured while filling;
- ``whole``: the whole-step rate, measured on uncut steps.

Filling trains ``busy1 * fill + (1 - busy1) * whole`` tokens a second against
``(1 - busy0) * whole`` without, so it pays iff ``busy1 * fill > (busy1 - busy0) * whole``. The
gate fills until all three rates are known, then as that says, with a hysteresis margin before
it switches. The inference step it sees comes at the batch filling leaves (larger than without),
and burstier arrivals than Poisson leave more idle time: both make ``busy0`` err high, toward
filling, where the SLO is watched anyway.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class _Decayed:
    """A running sum whose past weighs ``exp(-age / tau)``."""

    def __init__(self, tau_s: float) -> None:
        self.tau_s, self.total = tau_s, 0.0

    def decay(self, dt: float) -> None:
        self.total *= math.exp(-dt / self.tau_s)


class FillGate:
    """Tracks demand and the fine-tune rates; `should_fill` says which strategy wins now."""

    def __init__(
        self,
        tau_s: float = 2.0,
        hysteresis: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.hysteresis, self._clock = hysteresis, clock
        self.filling = True
        self.decisions = {True: 0, False: 0}  # iterations it let fill, and kept unfilled
        self._last = clock()
        # Demand, over the last ~tau seconds of wall time.
        self._wall, self._rows = _Decayed(tau_s), _Decayed(tau_s)
        self._steps, self._step_s = _Decayed(tau_s), _Decayed(tau_s)
        # Filled iterations and the tokens their fills trained: they age only while filling,
        # so they outlive a spell of not filling.
        self._iterations, self._iteration_s = _Decayed(tau_s), _Decayed(tau_s)
        self._fill_tokens = _Decayed(tau_s)
        self._whole_tokens, self._whole_s = _Decayed(4 * tau_s), _Decayed(4 * tau_s)

    def _advance(self) -> None:
        now = self._clock()
        dt, self._last = max(0.0, now - self._last), now
        aging = [self._wall, self._rows, self._steps, self._step_s]
        aging += [self._whole_tokens, self._whole_s]
        if self.filling:
            aging += [self._iterations, self._iteration_s, self._fill_tokens]
        for counter in aging:
            counter.decay(dt)
        self._wall.total += dt

    def on_inference(self, rows: float, seconds: float) -> None:
        """An inference step emitted ``rows`` tokens in ``seconds``."""
        self._advance()
        self._rows.total += rows
        self._steps.total += 1
        self._step_s.total += seconds

    def on_filled_iteration(self, seconds: float) -> None:
        """An iteration (fine-tune work, then the next inference step) lasted ``seconds``."""
        self._advance()
        self._iterations.total += 1
        self._iteration_s.total += seconds

    def on_fill_trained(self, tokens: int) -> None:
        """Fills finished a train step of ``tokens``."""
        self._advance()
        self._fill_tokens.total += tokens

    def on_whole_step(self, tokens: int, seconds: float) -> None:
        """A train step of ``tokens`` ran uncut, start to end, in ``seconds``."""
        self._whole_tokens.total += tokens
        self._whole_s.total += seconds

    def _busy(self, step_s: float) -> float:
        rate = self._rows.total / self._wall.total if self._wall.total else 0.0
        return 1 - math.exp(-rate * step_s)

    def rates(self) -> tuple[float, float] | None:
        """Fine-tune tokens per second (filling, not filling) at the current demand; None until
        the fill, whole-step and demand rates are all known."""
        known = (self._iteration_s, self._fill_tokens, self._whole_s, self._steps)
        if not all(counter.total for counter in known):
            return None
        whole = self._whole_tokens.total / self._whole_s.total
        fill = self._fill_tokens.total / self._iteration_s.total
        busy0 = self._busy(self._step_s.total / self._steps.total)
        busy1 = self._busy(self._iteration_s.total / self._iterations.total)
        return busy1 * fill + (1 - busy1) * whole, (1 - busy0) * whole

    def should_fill(self) -> bool:
        """Whether to fill the iteration that starts now."""
        self._advance()
        rates = self.rates()
        if rates is not None:
            fill, idle = rates
            keep = 1 - self.hysteresis
            self.filling = fill > idle * keep if self.filling else fill * keep > idle
        self.decisions[self.filling] += 1
        return self.filling

    @property
    def fill_share(self) -> float:
        """The share of the iterations it was asked about that it let fill (NaN: none)."""
        asked = sum(self.decisions.values())
        return self.decisions[True] / asked if asked else float("nan")
