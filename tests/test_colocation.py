"""Co-located serving and fine-tuning on the demo model: every policy serves every request, and
each fine-tunes exactly as much as its rule allows."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from harli_jax import LLM
from harli_jax.cli import main
from harli_jax.colocate import run_colocated, while_training
from harli_jax.demo_task import write_dataset
from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob
from harli_jax.engine.metrics import EngineMetrics
from harli_jax.lora.config import LoraConfig
from harli_jax.sched import pricing, static
from harli_jax.sched.calibration import (
    Calibration,
    inference_features,
    job_shape,
    option_id,
    train_key,
)
from harli_jax.sched.config import SchedulerConfig
from harli_jax.sched.costs import StepReport
from harli_jax.sched.cut_choice import iterations_per_step
from harli_jax.sched.predictor import Predictor
from harli_jax.sched.roofline import DeviceRates, measure_device_rates
from harli_jax.sched.runner import cuts
from harli_jax.sched.scheduler import _STALL_LIMIT, ColocationScheduler
from harli_jax.sched.trace import synthetic_trace


@pytest.fixture(scope="module")
def llm():
    return LLM.demo(max_num_seqs=4, max_model_len=128, page_size=32, prefill_chunk=64)


@pytest.mark.parametrize("policy", ["serve-only", "harli", "naive"])
def test_every_request_is_served_and_training_follows_the_policy(llm, policy, tmp_path):
    data = write_dataset(tmp_path / "task.jsonl")
    config = FineTuneConfig(
        data=data,
        out_dir=tmp_path / "job",
        lora=LoraConfig(r=4),
        steps=1000,
        batch_size=4,
        seq_len=64,
    )
    job = FineTuneJob("job", config, llm.model, llm.tokenizer)
    trace = synthetic_trace(4.0, 3.0, max_len=64, seed=1, mean_prompt=12, mean_output=12)
    report = run_colocated(
        llm,
        job,
        trace,
        SchedulerConfig(policy=policy, tpot_slo_s=0.5),
        predictor=Predictor(measure_device_rates()),
        show_progress=False,
    )
    assert report["requests"] == {"submitted": len(trace), "refused": 0, "finished": len(trace)}
    if policy == "serve-only":
        assert report["finetune_steps"] == 0
    else:
        assert report["finetune_steps"] > 0
        assert report["finetune_tokens"] > 0
    # Every token trained during the run is in the run's metrics, micro-stepped or not.
    assert sum(n for _, n in report["timeline"]["finetune"]) == report["finetune_tokens"]
    # The program timeline holds the inference steps, and fine-tune programs iff it trained.
    families = {family for _, family, _ in report["timeline"]["programs"]}
    assert "inference" in families
    assert any(f.startswith("train/") for f in families) == (policy != "serve-only")


def test_the_while_training_share_counts_only_the_samples_between_the_jobs_steps():
    """A job that ends early leaves serve-only tokens, which the run's attainment counts and the
    report's ``while_training`` does not: of the samples from its first step (t=1) to its last
    (t=3), one of three is late; the samples before and after are not counted."""
    tpot = [(0.5, 0.01), (1.0, 0.09), (2.0, 0.01), (3.0, 0.02), (4.0, 0.2)]
    finetune = [(1.0, 100), (2.5, 100), (3.0, 100)]
    report = while_training(tpot, finetune, slo_s=0.05)
    assert report["tokens"] == 3
    assert report["slo_attainment"] == pytest.approx(2 / 3)
    assert report["tpot_p99_ms"] == pytest.approx(np.percentile([0.09, 0.01, 0.02], 99) * 1e3)
    assert while_training(tpot, [], slo_s=0.05)["tokens"] == 0


def test_an_idle_loop_trains_whole_steps_as_one_program_outside_the_arena(llm, tmp_path):
    """Co-located, a step the idle loop starts runs as `train_step`'s one program: no arena
    pages, none of the whole cut's page round trips."""
    config = FineTuneConfig(
        data=write_dataset(tmp_path / "task.jsonl"), out_dir=tmp_path / "job", steps=20
    )
    job = FineTuneJob("idle", config, llm.model, llm.tokenizer)  # its own arena owner
    job.use_arena(llm.engine.arena)
    metrics = EngineMetrics()
    scheduler = ColocationScheduler(SchedulerConfig(), Predictor(measure_device_rates()), metrics)
    scheduler.add_job(job)
    assert scheduler.after_step(None)
    assert job.step == 1 and not job.holds_pages
    assert set(job.trainer._jitted) | set(job.trainer._ahead) == {("step", 4, 256)}
    assert metrics.summary()["finetune_tokens"] == job.tokens_trained > 0


@pytest.mark.slow
def test_main_job_learns_the_demo_task(tmp_path, capsys):
    """The README's main job, at the 150 steps the task needs and on a 60 s trace: the suite
    compiles without LLVM's optimisations (conftest), which slows the programs enough that 30 s
    ended a 150-step job at 99 of 138 steps, the adapter never served."""
    argv = ["train-colocated", "--out", str(tmp_path), "--duration", "60", "--steps", "150"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["task_accuracy"]["after"] >= report["task_accuracy"]["before"] + 0.3
    assert (tmp_path / "colocation.png").is_file() and (tmp_path / "adapter").is_dir()


# -- the scheduler's decisions, on a stand-in job (no device work) ------------------------------
RATES = DeviceRates(peak_flops=1e14, hbm_bytes_per_s=1e12)


def fake_job(r=16, targets=("q_proj", "v_proj"), rows=4, seq_len=512, layers=2):
    config = SimpleNamespace(
        lora=LoraConfig(r=r, target_modules=targets), batch_size=rows, seq_len=seq_len
    )
    trainer = SimpleNamespace(num_layers=layers)
    return SimpleNamespace(config=config, trainer=trainer, checkpoint_writing=False)


def scheduler_with_cuts(job, cut_ms: dict[int, list[float]], policy="harli", **config):
    """A scheduler whose calibration knows cut i (index into granularities) as micro-steps of
    these predicted (and calibrated) milliseconds."""
    predictor = Predictor(RATES)
    calibration = Calibration()
    scheduler = ColocationScheduler(
        SchedulerConfig(policy=policy, tpot_slo_s=0.02, **config), predictor, EngineMetrics()
    )
    scheduler.calibration = calibration
    options = cuts(job)
    for index, sizes in cut_ms.items():
        keys = []
        for n, ms in enumerate(sizes):
            key = train_key(job_shape(job), ("fwd", "cut", index, n))
            predictor.register(key, "train/fwd", {"flops": 0.0, "bytes accessed": ms * 1e9})
            calibration.seconds[key] = ms * 1e-3
            keys.append(key)
        calibration.cuts[option_id(job, options[index])] = keys
    return scheduler, options


def test_iterations_per_step_packs_in_order():
    def iterations(sizes, budgets):
        return iterations_per_step(sizes, [0.0] * len(sizes), budgets)

    assert iterations([6, 6, 6, 6], [10]) == 4
    assert iterations([3] * 8, [10]) == 3
    # 3 (8 does not fit the 7 left) | nothing fits 5 | 8 | 3
    assert iterations([3, 8, 3], [10, 5]) == 4
    assert iterations([11], [10, 5]) == float("inf")


def test_packing_charges_margins_as_a_fill_does_not_one_per_micro_step():
    """A fill prices the program in flight and the next by their estimates (expected seconds
    plus margin) and earlier ones by what they took: six 1.5 ms micro-steps of 0.5 ms margin
    fit one 10 ms budget (1.5 x 5 + 2 x 0.5 + 1.5), not the two that a margin on each needs."""
    assert iterations_per_step([1.5] * 6, [0.5] * 6, [10.0]) == 1
    assert iterations_per_step([1.5] * 6, [0.5] * 6, [9.9]) == 2
    assert iterations_per_step([9.0], [1.5], [10.0]) == float("inf")


def test_harli_picks_the_cut_that_finishes_a_step_in_fewest_iterations():
    """The old rule ("coarsest cut whose largest micro-step fits the median budget") took the
    coarse cut here and left 40% of every 10 ms budget idle: 4 iterations a step, not 3."""
    job = fake_job()
    scheduler, options = scheduler_with_cuts(job, {0: [6.0] * 4, 1: [3.0] * 8})
    scheduler._slack.extend([0.010] * 8)
    assert scheduler._harli_granularity(job) == options[1]
    # Equal iteration counts: the finer layer span (less of each budget left unused)...
    scheduler, options = scheduler_with_cuts(job, {0: [4.0] * 4, 1: [2.0] * 8})
    scheduler._slack.extend([0.010] * 8)
    assert scheduler._harli_granularity(job) == options[1]
    # ...but never a row split (options[2] runs each layer twice): it must take fewer.
    scheduler, options = scheduler_with_cuts(job, {0: [4.0] * 4, 2: [1.0] * 16})
    scheduler._slack.extend([0.010] * 8)
    assert scheduler._harli_granularity(job) == options[0]
    # A cut with a micro-step no recent budget fits is never chosen.
    scheduler, options = scheduler_with_cuts(job, {0: [12.0, 1.0], 1: [6.0] * 4})
    scheduler._slack.extend([0.010] * 8)
    assert scheduler._harli_granularity(job) == options[1]


def test_harli_starts_with_the_finest_layer_span_before_any_budget_is_seen():
    """Before its first fill harli knows no budget: its first step is cut one layer a span
    (options[1] here), not one row a chunk (options[-1]), whose tiny micro-steps priced filling
    below idle-time training on the H100 and kept harli from filling for the rest of the run."""
    job = fake_job()
    scheduler, options = scheduler_with_cuts(job, {1: [2.0] * 8, 3: [0.5] * 32})
    assert scheduler._harli_granularity(job) == options[1]


def test_a_step_that_stops_fitting_is_dropped_and_cut_again():
    """An open step never changes its cut: when its next micro-step (15 ms) fits none of the
    budgets the load now leaves (10 ms), it is abandoned after `_STALL_LIMIT` iterations in a
    row, not left to stall the job for good."""
    job = fake_job()
    job.done, job.in_step = False, True
    micro = SimpleNamespace(key=("fwd", "cut", 0, 0), kind="fwd")
    job.next_micro_step, job.open_micro_step = lambda cut: micro, lambda: micro
    job.abandon = lambda: setattr(job, "in_step", False)
    scheduler, _ = scheduler_with_cuts(job, {0: [15.0]})
    for _ in range(_STALL_LIMIT - 1):
        assert not scheduler._fill(job, time.perf_counter() + 0.010)
    assert job.in_step
    scheduler._fill(job, time.perf_counter() + 0.010)
    assert not job.in_step
    assert scheduler.metrics.summary()["finetune_steps_dropped"] == 1


def test_a_fill_leaves_room_for_the_next_start_before_the_update_that_completes_a_step():
    """The next step is started alongside the next inference step, which it outlasts by its
    expected delay (here 30 ms): the update that completes the open step must leave that."""
    job = fake_job()
    job.done, job.in_step, job.tokens_trained = False, True, 0
    update = SimpleNamespace(key=("fwd", "cut", 0, 0), kind="update")
    job.next_micro_step, job.open_micro_step = lambda cut: update, lambda: update
    scheduler, _ = scheduler_with_cuts(job, {0: [1.0]})
    dispatched = []

    def dispatch(job, micro, estimate):  # the update ran: the job has nothing left
        dispatched.append(micro)
        job.done = True

    scheduler.runner.dispatch = dispatch
    scheduler.starts._plan_s.append(0.030)
    assert not scheduler._fill(job, time.perf_counter() + 0.010)
    scheduler.starts._plan_s.clear()
    assert scheduler._fill(job, time.perf_counter() + 0.010) and dispatched == [update]


@pytest.mark.parametrize(
    "fuse_spans, deadline_ms, expected",
    [(4, 10.0, ("x4",)), (4, 3.0, ("x2",)), (4, 1.5, ()), (1, 10.0, ())],
)
def test_harli_runs_the_most_adjacent_spans_as_one_program_that_fits(
    fuse_spans, deadline_ms, expected
):
    """With ``fuse_spans``, a fill dispatches the largest fused program (4, then 2 micro-steps:
    here 4 and 2 ms) whose estimate fits before the deadline, else the micro-step itself."""
    job, (micro,) = open_step(["fwd"])
    scheduler, _ = scheduler_with_cuts(job, {0: [1.0]}, fuse_spans=fuse_spans)
    fused = {}
    for count, ms in ((2, 2.0), (4, 4.0)):
        fused[count] = SimpleNamespace(key=(*micro.key, f"x{count}"), kind="fwd")
        key = train_key(job_shape(job), fused[count].key)
        scheduler.predictor.register(key, "train/fwd", {"flops": 0.0, "bytes accessed": ms * 1e9})
    job.fused_micro_step = fused.get
    dispatched = []

    def dispatch(job, micro, estimate):
        dispatched.append(micro.key)
        job.done = True

    scheduler.runner.dispatch = dispatch
    assert scheduler._fill(job, time.perf_counter() + deadline_ms * 1e-3)
    assert dispatched == [(*micro.key, *expected)]


def test_static_budget_is_the_slo_less_the_p99_calibrated_step_and_never_adapts():
    job = fake_job()
    scheduler, options = scheduler_with_cuts(job, {0: [9.0, 9.0], 1: [5.0] * 4}, policy="static")
    scheduler.calibration.inference_s.extend([0.004] * 98 + [0.012, 0.013])
    expected = 0.02 - np.quantile(scheduler.calibration.inference_s, 0.99) - 0.0005
    config, calibration = scheduler.config, scheduler.calibration
    assert static.budget(config, calibration) == pytest.approx(expected)
    assert static.cut(config, calibration, job) == options[1]  # 9 ms does not fit 20 - 12 - 0.5
    fixed, _ = scheduler_with_cuts(job, {0: [1.0]}, policy="static", static_budget_s=0.003)
    assert static.budget(fixed.config, fixed.calibration) == 0.003


def test_harli_starts_from_the_backoff_a_warm_up_settled_at():
    """A calibration carries a warm-up's SLO backoff (through its JSON, as a profile file
    does) to a fresh scheduler, which starts there rather than learning it again from zero."""
    warmed = Calibration.from_json(Calibration(slo_backoff_s=0.003).to_json())
    rates = DeviceRates(peak_flops=1e14, hbm_bytes_per_s=1e12)
    config = SchedulerConfig(tpot_slo_s=0.02)
    scheduler = ColocationScheduler(config, Predictor(rates), EngineMetrics(), warmed)
    assert scheduler.backoff.seconds == 0.003
    fresh = ColocationScheduler(config, Predictor(rates), EngineMetrics())
    assert fresh.backoff.seconds == 0.0
    static_config = SchedulerConfig("static", tpot_slo_s=0.02)
    static_scheduler = ColocationScheduler(static_config, Predictor(rates), EngineMetrics(), warmed)
    assert static_scheduler.backoff.seconds == 0.0  # the backoff is harli's alone


def test_train_keys_carry_the_lora_shape():
    a, b = fake_job(r=16), fake_job(r=8)
    c, d = fake_job(rows=8, seq_len=256), fake_job(targets="all-linear")
    shapes = {job_shape(job) for job in (a, b, c, d)}
    assert len(shapes) == 4
    assert job_shape(a) == "r16-q_proj.v_proj-4x512"
    assert train_key(job_shape(a), ("update",)) != train_key(job_shape(b), ("update",))


def test_inference_features_count_programs_and_decode_pages():
    report = StepReport("forward/r8/t128/p4+forward/r2/t1/p8", {}, {"rows": 2.0}, 0.01)
    assert inference_features(report, after_train=True) == {
        "rows": 2.0,
        "calls": 2.0,
        "decode_pages": 8.0,
        "after_train": 1.0,
    }
    report = StepReport("forward/r1/t1/p2/topkp", {}, {"rows": 1.0}, 0.01)
    assert inference_features(report, after_train=False)["decode_pages"] == 2.0


def test_harli_budget_is_the_slo_less_the_next_step_with_its_absolute_margin():
    """Budget = SLO - (predicted x 1.05 + the p99 of seconds late) - loop overhead; a next step
    that adds a prefill chunk is priced as the slowest recent step that ran one, scaled up to
    its prompt tokens where it runs more."""
    job = fake_job()
    scheduler, _ = scheduler_with_cuts(job, {0: [1.0]})
    predictor, config = scheduler.predictor, scheduler.config
    decode = StepReport("forward/r4/t1/p2", {"flops": 0.0, "bytes accessed": 4e9}, {"rows": 4.0}, 0)
    scheduler.observe_inference(decode)  # registers the program; the first run may compile
    late = [0.0] * 95 + [0.001] * 5  # seconds each observed step ran over its prediction
    for extra in late:
        measured = predictor.predict(decode.key, **inference_features(decode, False)) + extra
        scheduler.observe_inference(dataclasses.replace(decode, seconds=measured))
    predicted = predictor.predict(decode.key, **inference_features(decode, after_train=True))
    margin = predictor.quantile_error_s("inference", config.error_quantile)
    assert margin == pytest.approx(np.quantile(late, 0.99), abs=2e-4)
    expected = 0.02 - (predicted * 1.05 + margin) - config.loop_overhead_s
    prefill_steps = scheduler.inference.prefill_steps
    budget = functools.partial(
        pricing.fill_budget, config, predictor, decode, prefill_steps=prefill_steps
    )
    assert budget(prefill_tokens=0) == pytest.approx(expected)
    # Nothing known of prefill steps yet: a step that will run one leaves no budget.
    assert budget(prefill_tokens=128) <= 0
    prefill_steps.extend([(0.009, 256), (0.012, 256), (0.010, 128)])
    prefill_budget = budget(prefill_tokens=128)
    assert prefill_budget == pytest.approx(0.02 - 0.012 - config.loop_overhead_s)
    # A chunk of more prompt tokens than those steps ran: the slowest, scaled to its tokens.
    assert budget(prefill_tokens=512) == pytest.approx(0.02 - 0.040 - config.loop_overhead_s)


def test_the_predictor_learns_from_an_inference_step_after_the_fill_is_planned():
    """Learning (refits, quantiles) is host time; made before the fill, it would keep the device
    idle between the step and the fill's first program."""
    scheduler, _ = scheduler_with_cuts(fake_job(), {0: [1.0]})
    decode = StepReport("forward/r4/t1/p2", {"flops": 0.0, "bytes accessed": 4e9}, {"rows": 4.0}, 0)
    scheduler.observe_inference(decode)  # registers the program; the first run may compile
    events = []
    observe = scheduler.predictor.observe
    scheduler.predictor.observe = lambda *a, **k: events.append("learn") or observe(*a, **k)
    scheduler._work = lambda report, prefill_tokens: events.append("fill") or False
    scheduler.after_step(dataclasses.replace(decode, seconds=0.004, ended_at=time.perf_counter()))
    assert events == ["fill", "learn"]


def test_a_micro_step_carries_the_p90_of_its_familys_lateness_not_the_p99():
    """An iteration runs several micro-steps and their margins add up, so each carries the 90th
    percentile of how late its family ran; the iteration's 99th is the backoff's."""
    job = fake_job()
    scheduler, _ = scheduler_with_cuts(job, {0: [1.0]})
    predictor = scheduler.predictor
    key = train_key(job_shape(job), ("fwd", "cut", 0, 0))
    predictor.observe(key, 0.001)  # the program's first run calibrates it
    late = [0.0] * 80 + [0.0002] * 15 + [0.002] * 5  # seconds each run ran over its prediction
    for extra in late:
        predictor.observe(key, predictor.predict(key) + extra)
    expected = predictor.predict(key) * 1.05 + np.quantile(late, 0.9)
    estimate = pricing.estimate(scheduler.config, predictor, "train/fwd", key)
    assert estimate == pytest.approx(expected, abs=2e-5)


class Running:
    """An inference program that has run (``ready``) or is still running."""

    def __init__(self, ready: bool = False) -> None:
        self.ready = ready

    def is_ready(self) -> bool:
        return self.ready

    def block_until_ready(self):
        return self


def open_step(kinds: list[str]):
    """A stand-in job inside a step whose next micro-steps are of ``kinds``, in order."""
    job = fake_job()
    job.done, job.in_step, job.tokens_trained = False, True, 0
    micros = [SimpleNamespace(key=("fwd", "cut", 0, 0), kind=kind) for kind in kinds]
    job.next_micro_step, job.open_micro_step = lambda cut: micros[0], lambda: micros[0]
    return job, micros


def test_the_open_steps_next_micro_step_is_queued_behind_the_running_inference_step():
    """The device goes from the inference step to the fill without waiting for the host, when
    the micro-step fits the tightest tenth of recent budgets; not once the step has run (the
    dispatch would delay its tokens), not behind a prefill chunk a decode may follow, never
    an update (its bookkeeping waits for it)."""
    job, _ = open_step(["fwd"])
    scheduler, _ = scheduler_with_cuts(job, {0: [1.0]})
    scheduler.jobs.append(job)
    dispatched = []
    scheduler.runner.dispatch = lambda job, micro, estimate: dispatched.append(estimate)
    scheduler._slack.extend([0.010] * 8)
    scheduler.during_step(Running(ready=True))
    scheduler.during_step(Running(), last=False)
    assert dispatched == []
    scheduler.during_step(Running())
    assert dispatched == [pytest.approx(scheduler._queued_behind)]
    assert dispatched[0] == pytest.approx(0.001 * 1.05, rel=0.05)
    scheduler._slack.extend([0.0005] * 64)  # budgets tighter than the micro-step now
    scheduler._queued_behind = None
    scheduler.during_step(Running())
    assert len(dispatched) == 1
    update_job, _ = open_step(["update"])
    scheduler.jobs[0] = update_job
    scheduler._slack.extend([0.010] * 64)
    scheduler.during_step(Running())
    assert len(dispatched) == 1
    scheduler.jobs[0] = job  # fits again, but the configuration turns queueing behind off
    scheduler.config.queue_behind = False
    scheduler.during_step(Running())
    assert len(dispatched) == 1


def test_harli_queues_behind_the_step_where_its_gate_leaves_the_iteration_unfilled_if_told():
    """Where the fill gate prefers idle-time training, the iteration gets no fill; with
    ``queue_unfilled`` the open step's next micro-step still runs behind the inference step, in
    time no whole step uses, and without it nothing does."""
    job, _ = open_step(["fwd"])
    scheduler, _ = scheduler_with_cuts(job, {0: [1.0]})
    scheduler.gate.filling = False
    scheduler.jobs.append(job)
    scheduler.runner.dispatch = lambda *args: pytest.fail("queued while the gate is not filling")
    scheduler._slack.extend([0.010] * 8)
    scheduler.during_step(Running())
    scheduler, _ = scheduler_with_cuts(job, {0: [1.0]}, queue_unfilled=True)
    scheduler.jobs.append(job)
    dispatched = []
    scheduler.runner.dispatch = lambda job, micro, estimate: dispatched.append(estimate)
    scheduler._slack.extend([0.010] * 8)
    scheduler.gate.filling = False
    scheduler.gate.should_fill = lambda: False
    scheduler.during_step(Running())
    assert len(dispatched) == 1
    report = StepReport("forward/r4/t1/p2", {}, {"rows": 4.0}, 0.002, ended_at=time.perf_counter())
    assert scheduler._advance(job, report, prefill_tokens=0)  # it ran: the queued one
    assert len(dispatched) == 1  # and no fill after it


def test_harli_fills_nothing_while_the_jobs_checkpoint_is_written():
    """A checkpoint's background write slowed every program ~2.5x on a 2-core CPU: until it
    ends, harli neither queues a micro-step behind the inference step nor fills the iteration,
    and once it has ended it does both again."""
    job, _ = open_step(["fwd"])
    scheduler, _ = scheduler_with_cuts(job, {0: [1.0]})
    scheduler.jobs.append(job)
    inference = {"flops": 0.0, "bytes accessed": 2e9}  # 2 ms of the 20 ms SLO
    scheduler.predictor.register("forward/r4/t1/p2", "inference", inference)
    dispatched = []

    def dispatch(job, micro, estimate):  # it completes the job: one dispatch is the last
        dispatched.append(micro)
        job.done = True

    scheduler.runner.dispatch = dispatch
    scheduler._slack.extend([0.010] * 8)

    def iteration() -> bool:
        scheduler.during_step(Running())
        ended = time.perf_counter()
        report = StepReport("forward/r4/t1/p2", {}, {"rows": 4.0}, 0.002, ended_at=ended)
        return scheduler._advance(job, report, prefill_tokens=0)

    job.checkpoint_writing = True
    assert not iteration() and dispatched == []
    job.checkpoint_writing = False
    assert iteration() and len(dispatched) == 1


def test_a_fill_stops_once_a_checkpoint_starts_being_written():
    """A step completed inside a fill may start its checkpoint's write: the fill dispatches
    nothing after that, though its budget (20 ms) has room for many more 1 ms micro-steps."""
    job, (micro,) = open_step(["fwd"])
    scheduler, _ = scheduler_with_cuts(job, {0: [1.0]})
    dispatched = []

    def dispatch(job, micro, estimate):  # as if the micro-step completed a checkpointed step
        dispatched.append(micro)
        job.checkpoint_writing = True

    scheduler.runner.dispatch = dispatch
    assert scheduler._fill(job, time.perf_counter() + 0.020)
    assert dispatched == [micro]


def test_static_charges_a_queued_micro_step_to_its_budget():
    """Static's first micro-step of an iteration may be queued behind the inference step; its
    calibrated time still comes out of that iteration's fixed budget."""
    job, _ = open_step(["fwd"] * 4)
    scheduler, _ = scheduler_with_cuts(job, {0: [3.0]}, policy="static", static_budget_s=0.007)
    scheduler.jobs.append(job)
    dispatched = []
    scheduler.runner.dispatch = lambda job, micro, seconds: dispatched.append(seconds)
    scheduler.during_step(Running())
    report = StepReport("forward/r4/t1/p2", {}, {"rows": 4.0}, 0.002, ended_at=time.perf_counter())
    scheduler._advance(job, report, prefill_tokens=0)
    assert dispatched == [0.003, 0.003]  # 7 ms: the queued one and one more, not a third


def test_a_micro_step_queued_behind_the_step_runs_on_while_the_fill_is_planned():
    """After a step, the scheduler plans the fill while the micro-step queued behind that step
    runs; only an idle loop (no step waited for the programs in flight) waits for them first."""
    scheduler, _ = scheduler_with_cuts(fake_job(), {0: [1.0]})
    scheduler._work = lambda report, prefill_tokens: False
    inflight = scheduler.runner.inflight
    inflight.add(jnp.zeros(()), time.perf_counter(), 0.001, lambda *record: None)
    cost, ended = {"flops": 0.0, "bytes accessed": 4e9}, time.perf_counter()
    report = StepReport("forward/r4/t1/p2", cost, {"rows": 4.0}, 0.002, ended_at=ended)
    scheduler.after_step(report)
    assert len(inflight) == 1
    scheduler.after_step(None)
    assert len(inflight) == 0
