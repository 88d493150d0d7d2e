"""Whether harli fills decode iterations: on a simulated serving loop (Poisson arrivals, a fixed
decode step, whole train steps in idle time, fills of fixed length), the gate picks the strategy
that the simulation shows training more, at light and at heavy load."""

from __future__ import annotations

import numpy as np
import pytest

from harli_jax.sched.fill_gate import FillGate

STEP_S = 0.004  # a decode step, at any batch
FILL_S = 0.010  # fine-tune work after each decode step, when filling
WHOLE_S = 0.048  # a whole train step, run when no request is running
OUTPUT_TOKENS = 200  # per request
WHOLE_RATE, FILL_RATE = 42_000.0, 18_000.0  # fine-tune tokens/s: whole steps, micro-steps


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(arrival_rate: float, fill: bool, gate: FillGate | None, seconds: float) -> float:
    """Fine-tune tokens per second of a loop that fills every iteration (or never), feeding
    ``gate`` (whose clock is the simulation's) as the scheduler does."""
    clock = gate._clock if gate else Clock()
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1 / arrival_rate, 100_000))
    running: list[int] = []
    next_arrival, trained, filled_since = 0, 0.0, None
    while clock.now < seconds:
        while arrivals[next_arrival] <= clock.now:
            running.append(OUTPUT_TOKENS)
            next_arrival += 1
        if not running:  # idle: a whole step, uninterruptible
            clock.now += WHOLE_S
            trained += WHOLE_S * WHOLE_RATE
            if gate:
                gate.on_whole_step(int(WHOLE_S * WHOLE_RATE), WHOLE_S)
            filled_since = None
            continue
        clock.now += STEP_S
        rows = len(running)
        running = [left - 1 for left in running if left > 1]
        if gate:
            gate.on_inference(rows, STEP_S)
            if filled_since is not None:
                gate.on_filled_iteration(clock.now - filled_since)
            gate.should_fill()
        filled_since = None
        if fill:
            filled_since = clock.now
            clock.now += FILL_S
            trained += FILL_S * FILL_RATE
            if gate:
                gate.on_fill_trained(int(FILL_S * FILL_RATE))
    return trained / clock.now


@pytest.mark.parametrize("arrival_rate", [0.7, 5.0], ids=["light", "heavy"])
def test_the_gate_picks_the_strategy_that_trains_more(arrival_rate):
    gate = FillGate(clock=Clock())
    simulated_fill = simulate(arrival_rate, True, gate, seconds=60)
    simulated_idle = simulate(arrival_rate, False, None, seconds=60)
    modelled_fill, modelled_idle = gate.rates()
    assert gate.should_fill() == (simulated_fill > simulated_idle)
    # The model behind the choice tracks the simulated loop (on the whole-step rate's scale).
    tolerance = 0.05 * WHOLE_RATE
    assert modelled_fill == pytest.approx(simulated_fill, abs=tolerance)
    assert modelled_idle == pytest.approx(simulated_idle, abs=tolerance)


def test_it_fills_until_it_has_measured_every_rate():
    gate = FillGate(clock=Clock())
    gate.on_inference(rows=1, seconds=STEP_S)
    gate.on_whole_step(2048, WHOLE_S)
    assert gate.rates() is None and gate.should_fill()
