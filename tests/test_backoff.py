"""The iteration-level SLO margin: it costs nothing while iterations are on time, and settles at
the budget cut that keeps the target share of iterations within the SLO (checked against the
quantile numpy computes over the same overruns)."""

from __future__ import annotations

import numpy as np
import pytest

from harli_jax.sched.backoff import SloBackoff, miss_cause

SLO = 0.020


def test_on_time_iterations_cost_nothing():
    backoff = SloBackoff()
    for _ in range(1000):
        backoff.observe(SLO * 0.9, SLO, fine_tune_s=SLO / 2)
    assert backoff.seconds == 0.0


def test_settles_where_the_target_share_is_on_time():
    rng = np.random.default_rng(0)
    # Iterations planned to end at the SLO overrun it by a noisy amount; the backoff is taken off
    # the budget, so an iteration lasts SLO + overrun - backoff.
    overruns = rng.exponential(0.002, size=200_000) - 0.004
    backoff, settled = SloBackoff(target=0.99, step_s=0.0002), []
    for i, overrun in enumerate(overruns):
        backoff.observe(SLO + overrun - backoff.seconds, SLO, fine_tune_s=SLO / 2)
        if i >= len(overruns) // 2:
            settled.append(backoff.seconds)
    want = np.quantile(overruns, 0.99)  # the cut that leaves 1% of iterations over
    assert np.mean(settled) == pytest.approx(want, abs=0.0005)
    assert np.mean(overruns[len(overruns) // 2 :] > np.array(settled)) == pytest.approx(
        0.01, abs=0.003
    )


def test_overruns_the_inference_side_made_alone_are_not_counted():
    backoff = SloBackoff()
    for _ in range(1000):  # a stall longer than the SLO, after a little fine-tune work
        backoff.observe(2 * SLO, SLO, fine_tune_s=0.1 * SLO)
    assert backoff.seconds == 0.0
    backoff.observe(1.05 * SLO, SLO, fine_tune_s=0.1 * SLO)  # fine-tuning made this one late
    assert backoff.seconds > 0.0


def test_never_takes_more_than_its_cap():
    backoff = SloBackoff(max_s=0.005)
    for _ in range(1000):
        backoff.observe(2 * SLO, SLO, fine_tune_s=SLO)
    assert backoff.seconds == 0.005


def test_rejects_a_target_outside_zero_one():
    with pytest.raises(ValueError, match="target"):
        SloBackoff(target=1.0)


def test_a_late_iteration_is_put_down_to_what_ran_past_the_fills_deadline():
    # The step before the fill ended at 0; the fill aimed at 10 ms; the SLO is 20 ms.
    def cause(returned, programs_ended, ended):
        return miss_cause(SLO, 0.0, 0.010, returned, programs_ended, ended)

    assert cause(returned=0.009, programs_ended=0.010, ended=0.020) == "on time"
    assert cause(returned=0.012, programs_ended=0.014, ended=0.024) == "programs"
    assert cause(returned=0.013, programs_ended=0.008, ended=0.021) == "host"  # a step start
    assert cause(returned=0.009, programs_ended=0.010, ended=0.026) == "inference"
