"""Micro-steps dispatched ahead of the host: each program's time, when the host waits, and that a
job run one program ahead trains the adapter a job run program by program does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harli_jax import LLM
from harli_jax.demo_task import write_dataset
from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob, granularities
from harli_jax.engine.metrics import EngineMetrics
from harli_jax.lora.config import LoraConfig
from harli_jax.sched.calibration import Calibration
from harli_jax.sched.config import SchedulerConfig
from harli_jax.sched.inflight import InFlight
from harli_jax.sched.predictor import Predictor
from harli_jax.sched.roofline import DeviceRates
from harli_jax.sched.runner import MicroStepRunner
from harli_jax.sched.scheduler import ColocationScheduler


class Clock:
    """Reads ``times`` in turn, then stays at the last; or is set by hand."""

    def __init__(self, *times: float) -> None:
        self.times, self.now = list(times), 0.0

    def __call__(self) -> float:
        if self.times:
            self.now = self.times.pop(0)
        return self.now


def test_a_program_is_timed_from_when_the_device_could_start_it():
    times = []
    # Clock reads: first queued, second queued, first seen ended (then after its finish),
    # second seen ended (then after its finish).
    clock = Clock(0.25, 1.0, 2.0, 2.0, 5.0, 5.0)
    queue = InFlight(depth=2, clock=clock)
    record = lambda seconds, finish_s, result: times.append(seconds)  # noqa: E731
    queue.add(jnp.zeros(()), dispatched=0.0, estimate=2.0, record=record)
    queue.add(jnp.zeros(()), dispatched=0.5, estimate=2.0, record=record)
    assert len(queue) == 1  # it waited for the first; the second stays queued
    queue.drain()
    # The first from when its dispatch returned, not from when it began; the second from the
    # first's end, not from its own (earlier) dispatch.
    assert times == [2.0 - 0.25, 5.0 - 2.0]


def test_a_program_found_ended_by_a_late_drain_has_no_time_but_is_recorded():
    """After other host work (the next inference step's dispatch) a program found ended may
    have ended long before: its time is unknown, not that long; its tokens still count."""
    records = []
    queue = InFlight(depth=2, clock=Clock(0.0, 3.0, 3.0))
    record = lambda seconds, finish_s, result: records.append(seconds)  # noqa: E731
    queue.add(jax.block_until_ready(jnp.zeros(())), dispatched=0.0, estimate=1.0, record=record)
    assert queue.drain(late=True) == 3.0  # when the host saw it ended
    assert records == [None]


def test_a_program_queued_behind_an_inference_step_is_timed_from_that_steps_end():
    """Queued while the inference program ran, it could start only once that ended: its time
    and what follows it count from then, not from its dispatch."""
    times = []
    queue = InFlight(depth=2, clock=Clock(1.0, 1.0, 7.0, 7.0))
    record = lambda seconds, finish_s, result: times.append(seconds)  # noqa: E731
    queue.add(jnp.zeros(()), dispatched=0.5, estimate=2.0, record=record)
    queue.hold_until(4.0)  # the host saw the inference step end at 4
    assert queue.busy_until() == pytest.approx(6.0)
    queue.drain()
    assert times == [7.0 - 4.0]


def test_busy_until_chains_the_estimates_of_what_is_queued():
    clock = Clock()
    queue = InFlight(depth=3, clock=clock)
    record = lambda *args: None  # noqa: E731
    assert queue.busy_until() == 0.0
    queue.add(jnp.zeros(()), dispatched=0.0, estimate=2.0, record=record)
    clock.now = 0.5
    queue.add(jnp.zeros(()), dispatched=0.5, estimate=3.0, record=record)
    assert queue.busy_until() == pytest.approx(5.0)
    clock.now = 9.0  # later than the estimates: the device is idle now
    assert queue.busy_until() == 9.0


def test_a_dispatch_delays_a_program_only_when_nothing_is_queued_ahead():
    clock = Clock()
    queue = InFlight(depth=3, clock=clock)
    record = lambda *args: None  # noqa: E731
    clock.now = 0.5  # a dispatch that took half a second
    queue.add(jnp.zeros(()), dispatched=0.0, estimate=2.0, record=record)
    assert queue.busy_until() == pytest.approx(2.5)  # the next one's dispatch hides behind it
    queue.drain()
    clock.now = 10.0
    assert queue.busy_until() == pytest.approx(10.5)  # nothing queued: its dispatch shows


def test_a_program_with_host_work_after_it_drains_the_queue_first():
    clock, seen = Clock(), []

    def finish():
        clock.now += 0.25
        return {"tokens": 7}

    queue = InFlight(depth=4, clock=clock)
    queue.add(jnp.zeros(()), 0.0, 1.0, lambda s, f, r: seen.append(("first", r)))
    queue.add(jnp.zeros(()), 0.0, 1.0, lambda s, f, r: seen.append(("update", f, r)), finish)
    assert len(queue) == 0
    assert seen == [("first", None), ("update", 0.25, {"tokens": 7})]


def test_depth_one_waits_for_every_program():
    queue = InFlight(depth=1)
    queue.add(jnp.zeros(()), 0.0, 1.0, lambda *args: None)
    assert len(queue) == 0
    with pytest.raises(ValueError, match="depth"):
        InFlight(depth=0)


def test_a_scheduler_keeps_as_many_programs_in_flight_as_configured():
    """``inflight_depth`` 3: after a third dispatch two programs are still queued."""
    config = SchedulerConfig("harli", 0.05, inflight_depth=3)
    rates = DeviceRates(peak_flops=1e12, hbm_bytes_per_s=1e11)
    queue = ColocationScheduler(config, Predictor(rates), EngineMetrics()).runner.inflight
    for _ in range(3):
        queue.add(jnp.zeros(()), 0.0, 1.0, lambda *args: None)
    assert len(queue) == 2


def _job(tmp_path, name: str) -> tuple[LLM, FineTuneJob]:
    llm = LLM.demo(max_num_seqs=2, max_model_len=128, page_size=32, prefill_chunk=64)
    config = FineTuneConfig(
        data=write_dataset(tmp_path / "task.jsonl"),
        out_dir=tmp_path / name,
        lora=LoraConfig(r=4),
        steps=2,
        batch_size=2,
        seq_len=64,
        warmup_steps=1,
        checkpoint_every=100,
    )
    job = FineTuneJob("job", config, llm.model, llm.tokenizer)
    job.use_arena(llm.engine.arena)
    return llm, job


def test_a_job_run_one_program_ahead_trains_the_same_adapter(tmp_path):
    _, alone = _job(tmp_path, "one-by-one")
    _, ahead = _job(tmp_path, "ahead")
    cut = granularities(alone.trainer.num_layers, 2)[-1]
    while not alone.done:
        alone.run(alone.next_micro_step(cut))
    counted = []
    runner = MicroStepRunner(
        Predictor(DeviceRates(peak_flops=1e14, hbm_bytes_per_s=1e12)),
        Calibration(),
        counted.append,
        depth=2,
    )
    while not ahead.done:
        runner.dispatch(ahead, ahead.next_micro_step(cut))
        assert len(runner.inflight) <= 1
    runner.inflight.drain()
    assert ahead.losses == pytest.approx(alone.losses, rel=1e-6)
    assert sum(counted) == ahead.tokens_trained
    for got, want in zip(jax.tree.leaves(ahead.trainer.lora), jax.tree.leaves(alone.trainer.lora)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_a_step_completed_with_programs_queued_ahead_trains_the_same_adapter(tmp_path):
    """The idle loop's `complete_step` keeps ``depth`` programs queued; the step it completes,
    opened by one micro-step as a fill would, matches the same step run program by program."""
    _, alone = _job(tmp_path, "one-by-one")
    _, ahead = _job(tmp_path, "ahead")
    cut = granularities(alone.trainer.num_layers, 2)[-1]
    while not alone.done:
        alone.run(alone.next_micro_step(cut))
    rates = DeviceRates(peak_flops=1e14, hbm_bytes_per_s=1e12)
    runner = MicroStepRunner(Predictor(rates), Calibration(), depth=3)
    while not ahead.done:
        runner.dispatch(ahead, ahead.next_micro_step(cut))  # a fill opens the step
        assert runner.complete_step(ahead, cut)
        assert not ahead.in_step and len(runner.inflight) == 0
    assert ahead.losses == pytest.approx(alone.losses, rel=1e-6)
    for got, want in zip(jax.tree.leaves(ahead.trainer.lora), jax.tree.leaves(alone.trainer.lora)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_a_scheduler_counts_micro_stepped_tokens_in_the_metrics_a_run_swaps_in(tmp_path):
    _, job = _job(tmp_path, "job")
    rates = DeviceRates(peak_flops=1e14, hbm_bytes_per_s=1e12)
    scheduler = ColocationScheduler(SchedulerConfig(), Predictor(rates), EngineMetrics())
    scheduler.metrics = run_metrics = EngineMetrics()
    scheduler.runner.run_step(job, granularities(job.trainer.num_layers, 2)[-1])
    assert job.tokens_trained > 0
    assert run_metrics.summary()["finetune_tokens"] == job.tokens_trained
