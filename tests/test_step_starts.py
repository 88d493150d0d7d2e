"""Harli's step starts: made while the inference step runs (the cut, then the plan if that step
has still not run); in a fill only when a typical start fits before the deadline."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

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
    """An inference program that is ready from its ``ready_after``-th poll on, or once waited
    for."""

    def __init__(self, ready_after: int = 1_000) -> None:
        self.polls, self.ready_after = 0, ready_after

    def is_ready(self) -> bool:
        self.polls += 1
        return self.polls > self.ready_after

    def block_until_ready(self):
        self.polls = self.ready_after
        return self


def cut(n: int):
    return (n, [(0, 22)])


def starts_with(free_s: float, cut_s: float = 0.001, plan_s: float = 0.001):
    """A `StepStarts` whose records say: the host is free ``free_s`` during a step, a cut
    takes ``cut_s`` and a plan ``plan_s``; and the cuts it chose."""
    choices = []

    def choose(job):  # the n-th choice: n token chunks, one span of 22 layers
        choices.append(job)
        return cut(len(choices))

    starts = StepStarts(choose)
    starts._free_s.append(free_s)
    starts._cut_s.append(cut_s)
    starts._plan_s.append(plan_s)
    return starts, choices


def test_a_step_starts_while_the_inference_step_runs():
    job = Job()
    starts, choices = starts_with(free_s=0.010)
    starts.while_running(job, Running())
    assert len(choices) == 1 and job.planned == [cut(1)] and job.in_step
    assert starts.made == {"while running": 1}
    summary = starts.summary()
    assert summary["while running"] == 1 and summary["free_ms"] == 10.0
    assert summary["steps_by_cut"] == {"1x1": 1}
    assert set(summary) == {"while running", "cut_ms", "plan_ms", "free_ms", "steps_by_cut"}


def test_a_plan_the_inference_step_leaves_no_time_for_is_left_to_the_fill_with_its_cut():
    job = Job()
    starts, choices = starts_with(free_s=0.010)
    assert starts.while_running(job, Running(ready_after=1))  # ready once the cut is chosen
    assert len(choices) == 1 and job.planned == []
    micro = starts.before(job, deadline=time.perf_counter() + 1.0)
    assert micro.key == ("fwd", cut(1)) and len(choices) == 1  # the cut is not chosen again
    assert starts.made == {"plan left to the fill": 1, "in a fill": 1}


def test_nothing_is_done_once_the_inference_step_has_run():
    job = Job()
    starts, choices = starts_with(free_s=0.010)
    assert not starts.while_running(job, Running(ready_after=0))
    assert job.planned == [] and choices == []


def test_the_expected_delay_is_what_a_start_takes_beyond_the_hosts_usual_free_time():
    starts, _ = starts_with(free_s=0.001, cut_s=0.002, plan_s=0.003)
    assert starts.expected_delay() == pytest.approx(0.004)  # a cut is due
    starts.cut = "kept"
    assert starts.expected_delay() == pytest.approx(0.002)
    starts._free_s.extend([0.010] * 10)
    assert starts.expected_delay() == 0.0


def test_with_a_step_open_it_waits_for_the_inference_step_and_learns_the_free_time():
    job = Job()
    job.in_step = True
    starts, choices = starts_with(free_s=0.010)
    running = Running()
    starts.while_running(job, running)
    assert running.polls == running.ready_after  # waited for
    assert len(starts._free_s) == 2 and choices == []


def test_a_cut_is_kept_for_a_few_starts():
    job = Job()
    starts, _ = starts_with(free_s=0.010)
    for _ in range(RECUT_EVERY + 1):
        job.in_step = False
        starts.while_running(job, Running())
    assert job.planned == [cut(1)] * RECUT_EVERY + [cut(2)]


def test_a_slow_start_does_not_block_later_fill_starts_for_good():
    """Fill starts are gated on the median recent start time; one slow start (11 ms, in 9 ms
    budgets) is forgotten after `GATED_LIMIT` gated fills, as no new sample can come."""
    job = Job()
    starts = StepStarts(lambda job: cut(1))
    starts._plan_s.append(0.011)
    made = [starts.before(job, time.perf_counter() + 0.009) for _ in range(GATED_LIMIT + 1)]
    assert made[:GATED_LIMIT] == [None] * GATED_LIMIT and made[-1] is not None
