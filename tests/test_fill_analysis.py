"""bench/fill_analysis.py splits a co-located run's program timeline into iterations: one
inference program, the fine-tune programs dispatched before the next, and the host time left;
and it puts each late token on a cause."""

import numpy as np
import pytest

from bench.fill_analysis import (
    iterations,
    late_tokens,
    margin_evidence,
    prediction_errors,
    summarise,
)

# (start, family, seconds): two filled iterations and one unfilled, then the last step; the
# fill's last program was seen late (no time); calibration entries come before the trace (t < 0).
PROGRAMS = [
    (-1.0, "train/fwd", 0.5),
    (0.000, "inference", 0.002),
    (0.0025, "train/fwd", 0.001),
    (0.0036, "train/bwd", 0.002),
    (0.0060, "inference", 0.002),
    (0.0085, "train/fwd", None),
    (0.0100, "inference", 0.002),
    (0.0130, "inference", 0.002),
]


def test_an_iteration_runs_from_one_inference_program_to_the_next():
    found = iterations(PROGRAMS)
    assert [i["micro_steps"] for i in found] == [2, 1, 0]
    assert [i["seconds"] for i in found] == pytest.approx([0.006, 0.004, 0.003])
    assert found[0]["train_s"] == pytest.approx(0.003)
    assert found[0]["programs"] == [("train/fwd", 0.001), ("train/bwd", 0.002)]
    assert found[1]["train_s"] == 0.0  # seen late: counted, not timed


def test_a_run_is_summarised_over_its_filled_iterations():
    run = dict(
        policy="harli",
        load="heavy",
        timeline=dict(programs=PROGRAMS, finetune=[(-1.0, 512), (0.009, 300)]),
    )
    row = summarise(run, slo_ms=10.0)
    assert row["filled_iterations"] == 2
    assert row["iteration_ms"] == pytest.approx(5.0)  # median of 6 and 4 ms
    assert row["slo_left_ms"] == pytest.approx(5.0)
    assert row["micro_steps"] == 1.5
    assert row["tokens_per_train_ms"] == pytest.approx(300 / 3.0)  # the trace's tokens only
    assert row["tokens_per_filled_iteration_ms"] == pytest.approx(300 / 10.0)


def test_strays_that_take_from_the_next_program_cancel_in_the_fill_sum():
    # Each fill: four 1 ms forwards; the host sees one end d late, so the next starts d late
    # and is measured d short: the fill's sum is exact, each program strays by +-d.
    rng = np.random.default_rng(0)
    filled = []
    for d in rng.uniform(0.0, 0.0004, 200):
        filled.append(dict(programs=[("train/fwd", s) for s in (1e-3 + d, 1e-3 - d) * 2]))
    found = margin_evidence(filled)
    assert found["consecutive_stray_corr"] < -0.3
    assert found["fill_stray_p90_ms"] == pytest.approx(0.0, abs=1e-9)
    assert found["summed_program_p90_ms"] > 0.5  # four programs' p90 of ~0.16 ms each


def test_a_late_token_is_put_on_the_step_that_emitted_it():
    programs = [
        (0.000, "inference", 0.002),
        (0.003, "train/fwd", 0.006),  # a fill before the next step
        (0.010, "inference", 0.002),
        (0.013, "inference", 0.012),  # alone over a 10 ms SLO
        (0.026, "inference", 0.002),  # no fill before it
    ]
    tpot = [(0.0125, 0.0105), (0.0255, 0.013), (0.0255, 0.011), (0.0285, 0.0105), (0.0285, 0.003)]
    run = dict(policy="harli", load="heavy", timeline=dict(programs=programs, tpot=tpot))
    found = late_tokens(run, slo_ms=10.0)
    assert found["late_tokens"] == 4
    assert found["late_tokens_by_cause"] == {
        "fill before the step": 1,
        "step alone over the SLO": 2,
        "no fill before the step": 1,
    }
    assert found["steps_over_slo"] == 1


def test_inference_errors_are_split_by_what_came_before_the_step():
    # (when, family, measured s, predicted s, rows, prefill tokens, after_train)
    predictions = [
        (0.1, "inference", 0.0030, 0.0020, 8, 0, 1.0),
        (0.2, "inference", 0.0020, 0.0020, 8, 0, 1.0),
        (0.3, "inference", 0.0021, 0.0020, 8, 0, 0.0),
        (0.4, "inference", 0.0050, 0.0040, 8, 512, 0.0),
        (0.5, "train/fwd", 0.0009, 0.0010, 0, 0, 0.0),
    ]
    found = prediction_errors(dict(policy="harli", load="heavy", predictions=predictions))
    errors = found["errors"]
    assert set(errors) == {
        "inference after train",
        "inference after inference",
        "inference after inference, prefill",
        "train/fwd",
    }
    after_train = errors["inference after train"]
    assert after_train["n"] == 2
    assert after_train["mape"] == pytest.approx(np.mean([0.5, 0.0]))
    assert after_train["late_p50_ms"] == pytest.approx(0.5)
    assert errors["train/fwd"]["late_p99_ms"] == pytest.approx(-0.1)
