"""Harli's step starts: made while the inference step runs, piece by piece until it has run; in a
fill only when a typical start fits before the deadline."""

from __future__ import annotations

import time
from types import SimpleNamespace

from harli_jax.sched.step_starts import GATED_LIMIT, RECUT_EVERY, StepStarts


class Job:
    """A job whose starts record the cut they were planned with."""

    def __init__(self) -> None:
        self.done, self.in_step, self.planned = False, False, []

    def next_micro_step(self, cut):
        self.planned.append(cut)
        self.in_step = True
        return SimpleNamespace(key=("fwd", cut))


class Running:
    """An inference program that reports itself ready from its ``ready_after``-th poll on."""

    def __init__(self, ready_after: int) -> None:
        self.polls, self.ready_after = 0, ready_after

    def is_ready(self) -> bool:
        self.polls += 1
        return self.polls > self.ready_after


def counting_choice(choices: list):
    def choose(job):
        choices.append(job)
        return f"cut {len(choices)}"

    return choose


def test_a_step_starts_while_the_inference_step_runs():
    job, choices = Job(), []
    starts = StepStarts(counting_choice(choices))
    starts.while_running(job, Running(ready_after=2))
    assert len(choices) == 1 and job.planned == ["cut 1"] and job.in_step
    assert starts.made == {"while running": 1}


def test_a_start_stops_between_cut_and_plan_once_the_step_has_run_and_the_fill_finishes_it():
    job, choices = Job(), []
    starts = StepStarts(counting_choice(choices))
    starts.while_running(job, Running(ready_after=1))  # ready after the cut was chosen
    assert len(choices) == 1 and job.planned == []
    micro = starts.before(job, deadline=time.perf_counter() + 1.0)
    assert micro.key == ("fwd", "cut 1") and len(choices) == 1  # the cut is not chosen again
    assert starts.made == {"cut only": 1, "in a fill": 1}


def test_nothing_starts_over_an_open_step_or_after_the_step_has_run():
    job, choices = Job(), []
    starts = StepStarts(counting_choice(choices))
    job.in_step = True
    starts.while_running(job, Running(ready_after=9))
    job.in_step = False
    starts.while_running(job, Running(ready_after=0))
    assert choices == [] and job.planned == []


def test_a_cut_is_kept_for_a_few_starts():
    job, choices = Job(), []
    starts = StepStarts(counting_choice(choices))
    for _ in range(RECUT_EVERY + 1):
        job.in_step = False
        starts.while_running(job, Running(ready_after=9))
    assert job.planned == ["cut 1"] * RECUT_EVERY + ["cut 2"]


def test_a_slow_start_does_not_block_later_fill_starts_for_good():
    """Fill starts are gated on the median recent start time; one slow start (11 ms, in 9 ms
    budgets) is forgotten after `GATED_LIMIT` gated fills, as no new sample can come."""
    job = Job()
    starts = StepStarts(lambda job: "cut")
    starts._start_s.append(0.011)
    made = [starts.before(job, time.perf_counter() + 0.009) for _ in range(GATED_LIMIT + 1)]
    assert made[:GATED_LIMIT] == [None] * GATED_LIMIT and made[-1] is not None
