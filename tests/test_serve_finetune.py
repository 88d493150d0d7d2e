"""Fine-tuning as a service through the official `openai` client, against the real job manager and
co-location scheduler on a tiny CPU model: an uploaded file becomes a job that trains between
inference steps and whose adapter is then served under its ``fine_tuned_model`` name; jobs outlive
a restart of the server; a cancelled job stops training."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest

from harli_jax import LLM, SamplingParams
from harli_jax.engine.jobs import JobManager
from harli_jax.serve import BackgroundServer, create_app

MODEL = "tiny-llama"
PROMPT = "The cat sat on"
CONTEXT = 64
# Short enough that one packed row holds both examples: with batch_size 1, a step per epoch.
TRAINING_DATA = b'{"prompt": "2+2=", "completion": " 4"}\n{"prompt": "3+3=", "completion": " 6"}\n'
# A high learning rate, so that a few steps move the adapter far from zero.
FAST = {"batch_size": 1, "learning_rate_multiplier": 50.0}
TIMEOUT_S = 120.0


@contextlib.contextmanager
def serving(model_dir: Path, state_dir: Path) -> Iterator[SimpleNamespace]:
    """One life of ``harli-jax serve --state-dir state_dir``, wired as the CLI wires it."""
    # Arena pages beyond the two sequences' KV: room for a fine-tune step's activations.
    llm = LLM(
        model_dir,
        dtype="float32",
        max_model_len=CONTEXT,
        page_size=CONTEXT,
        max_num_seqs=2,
        num_pages=64,
    )
    jobs = JobManager.colocated(llm.engine, MODEL, state_dir / "jobs", tpot_slo_s=0.05)
    engine = jobs.engine.start()
    app = create_app(engine, MODEL, jobs=jobs, files_dir=state_dir / "files", tpot_slo_ms=50)
    try:
        with BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            yield SimpleNamespace(client=client, url=server.url, engine=engine, state=state_dir)
    finally:
        engine.stop()


def upload(client: openai.OpenAI) -> str:
    return client.files.create(file=("train.jsonl", TRAINING_DATA), purpose="fine-tune").id


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def finished(client: openai.OpenAI, job_id: str):
    """The job once it has ended (bounded wait)."""
    ended = ("succeeded", "failed", "cancelled")
    wait_until(lambda: client.fine_tuning.jobs.retrieve(job_id).status in ended)
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status in ended, f"still {job.status} after {TIMEOUT_S} s"
    return job


def messages(client: openai.OpenAI, job_id: str) -> list[str]:
    """The job's event messages, oldest first."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=100)
    return [event.message for event in reversed(events.data)]


def finetune_tokens(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(next(v for k, v in _samples(text) if k == "harli_finetune_tokens_total"))


def _samples(text: str) -> list[tuple[str, str]]:
    return [tuple(line.rsplit(" ", 1)) for line in text.splitlines() if not line.startswith("#")]


def reference(model_dir: Path, adapter_dir: Path):
    """The independent reference: the library generating with the adapter the job saved on disk
    (HF PEFT format), loaded into a fresh model as a user would."""
    llm = LLM(model_dir, dtype="float32", max_model_len=CONTEXT)
    llm.load_adapter("ft", adapter_dir)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1, adapter="ft")
    return llm.generate(PROMPT, params)[0]


def served_answer(client: openai.OpenAI, model: str):
    return client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1
    ).choices[0]


# -- a job from upload to serving --------------------------------------------------------------


@pytest.fixture(scope="module")
def life(checkpoint, tmp_path_factory):
    with serving(checkpoint("llama"), tmp_path_factory.mktemp("state")) as running:
        yield running


@pytest.fixture(scope="module")
def succeeded(life):
    """A three-epoch job on an upload, run to its end, with the fine-tune tokens that /metrics
    counted meanwhile."""
    file_id = upload(life.client)
    tokens_before = finetune_tokens(life.url)
    job = life.client.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 3, **FAST}
    )
    done = finished(life.client, job.id)
    counted = finetune_tokens(life.url) - tokens_before
    return SimpleNamespace(file_id=file_id, job=job, done=done, counted=counted)


def test_an_uploaded_file_is_kept_until_deleted(life):
    uploaded = life.client.files.create(file=("keep.jsonl", TRAINING_DATA), purpose="fine-tune")
    assert (uploaded.bytes, uploaded.filename) == (len(TRAINING_DATA), "keep.jsonl")
    assert life.client.files.retrieve(uploaded.id) == uploaded
    assert life.client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        life.client.files.retrieve(uploaded.id)


def test_a_job_trains_its_epochs_and_succeeds_as_ft_base_job_id(life, succeeded):
    job, done = succeeded.job, succeeded.done
    assert job.training_file == done.training_file == succeeded.file_id
    assert (done.status, done.error) == ("succeeded", None)
    assert done.fine_tuned_model == f"ft:{MODEL}:{job.id}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at
    log = messages(life.client, job.id)
    assert (log[0], log[-1]) == ("Job created", f"Job succeeded: {done.fine_tuned_model}")
    assert "Trained 3 steps" in " ".join(log)  # one packed batch per epoch


def test_the_fine_tuned_model_is_listed_beside_the_base(life, succeeded):
    name = succeeded.done.fine_tuned_model
    assert [model.id for model in life.client.models.list()] == [MODEL, name]
    assert life.client.models.retrieve(name).parent == MODEL


def test_the_fine_tuned_model_answers_as_its_saved_adapter_does(checkpoint, life, succeeded):
    got = served_answer(life.client, succeeded.done.fine_tuned_model)
    adapter_dir = life.state / "jobs" / succeeded.job.id / "adapter"
    expected = reference(checkpoint("llama"), adapter_dir)
    assert got.text == expected.text
    assert got.logprobs.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs])
    # The check has teeth: the adapter moved the model away from the base.
    base = served_answer(life.client, MODEL)
    assert not np.allclose(got.logprobs.token_logprobs, base.logprobs.token_logprobs)


def test_a_job_whose_adapter_cannot_be_written_fails_and_is_not_served(life, monkeypatch):
    """The adapter is written after the last step, off the engine loop; a write that fails (a
    full disk) fails the job with its error, and no model is served that a restart would lose."""

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("harli_jax.engine.finetune.save_adapter", disk_full)
    job = life.client.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(life.client), hyperparameters={"n_epochs": 1, **FAST}
    )
    done = finished(life.client, job.id)
    assert done.status == "failed" and "No space left on device" in done.error.message
    assert f"ft:{MODEL}:{job.id}" not in [model.id for model in life.client.models.list()]


def test_a_deleted_fine_tuned_model_is_not_served_and_stays_deleted(life):
    """DELETE /v1/models/ft:...: the model is no longer listed or served; the job keeps its
    record and its adapter files, and the deletion is recorded, so a restart does not serve the
    model again."""
    job = life.client.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(life.client), hyperparameters={"n_epochs": 1, **FAST}
    )
    name = finished(life.client, job.id).fine_tuned_model
    assert name in [model.id for model in life.client.models.list()]

    assert life.client.models.delete(name).deleted

    assert name not in [model.id for model in life.client.models.list()]
    with pytest.raises(openai.NotFoundError):
        served_answer(life.client, name)
    assert life.client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == name
    record = json.loads((life.state / "jobs" / job.id / "record.json").read_text())
    assert record["model_deleted"] is True
    assert (life.state / "jobs" / job.id / "adapter" / "adapter_model.safetensors").is_file()


def test_a_restart_serves_succeeded_jobs_models_but_not_deleted_ones(tmp_path, monkeypatch):
    """The records a manager opens decide what it serves: a succeeded job's model again, unless
    it was deleted."""
    for job_id, deleted in (("ftjob-kept", False), ("ftjob-gone", True)):
        folder = tmp_path / job_id
        folder.mkdir()
        record = dict(
            id=job_id, status="succeeded", created_at=1, model=MODEL, training_file="t.jsonl",
            hyperparameters={}, fine_tuned_model=f"ft:{MODEL}:{job_id}", model_deleted=deleted,
            events=[],
        )  # fmt: skip
        (folder / "record.json").write_text(json.dumps(record))
    monkeypatch.setattr("harli_jax.engine.jobs.load_adapter", lambda folder: ({}, None))
    served = []
    core = SimpleNamespace(load_adapter=lambda name, weights, config: served.append(name))
    engine = SimpleNamespace(core=core, call_soon=lambda work: work())
    JobManager(engine, SimpleNamespace(), MODEL, tmp_path)
    assert served == [f"ft:{MODEL}:ftjob-kept"]


def test_metrics_count_the_tokens_the_job_trained(succeeded):
    assert succeeded.counted == succeeded.done.trained_tokens


def test_jobs_are_listed_newest_first_across_pages(life):
    file_id = upload(life.client)
    created = [
        life.client.fine_tuning.jobs.create(
            model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 1, **FAST}
        ).id
        for _ in range(3)
    ]
    try:
        page = life.client.fine_tuning.jobs.list(limit=2)
        assert [job.id for job in page.data] == [created[2], created[1]] and page.has_more
        rest = life.client.fine_tuning.jobs.list(limit=2, after=page.data[-1].id)
        assert rest.data[0].id == created[0]
    finally:
        for job_id in created:
            with contextlib.suppress(openai.BadRequestError):  # it may have finished already
                life.client.fine_tuning.jobs.cancel(job_id)


def test_a_job_trains_on_when_its_uploaded_file_is_deleted(life):
    file_id = upload(life.client)
    job = life.client.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 1, **FAST}
    )
    life.client.files.delete(file_id)
    done = finished(life.client, job.id)
    assert (done.status, done.training_file) == ("succeeded", file_id)


def test_a_cancelled_job_stops_training_is_not_served_and_cancels_once(life):
    job = life.client.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(life.client), hyperparameters={"n_epochs": 1000}
    )
    before = finetune_tokens(life.url)
    assert wait_until(lambda: finetune_tokens(life.url) > before)  # it is training
    cancelled = life.client.fine_tuning.jobs.cancel(job.id)
    assert (cancelled.status, cancelled.fine_tuned_model) == ("cancelled", None)
    # The loop takes its work in order: once this request is answered, the cancel has landed.
    served_answer(life.client, MODEL)
    tokens = finetune_tokens(life.url)
    time.sleep(0.5)
    assert finetune_tokens(life.url) == tokens
    assert messages(life.client, job.id)[-1] == "Job cancelled"
    assert f"ft:{MODEL}:{job.id}" not in [model.id for model in life.client.models.list()]
    with pytest.raises(openai.BadRequestError):
        life.client.fine_tuning.jobs.cancel(job.id)


# -- restarts ----------------------------------------------------------------------------------

CUT_STEPS = 20  # a checkpoint every 2


@pytest.fixture(scope="module")
def restarted(checkpoint, tmp_path_factory):
    """A second life over the first's state: the first ended with job ``done`` succeeded (its
    answer ``before``) and job ``cut`` stopped mid-training, after a checkpoint."""
    state = tmp_path_factory.mktemp("restarted")
    with serving(checkpoint("llama"), state) as first:
        file_id = upload(first.client)
        job = first.client.fine_tuning.jobs.create(
            model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 2, **FAST}
        )
        done = finished(first.client, job.id)
        before = served_answer(first.client, done.fine_tuned_model)
        cut = first.client.fine_tuning.jobs.create(
            model=MODEL, training_file=file_id, hyperparameters={"n_epochs": CUT_STEPS, **FAST}
        )
        saved = state / "jobs" / cut.id / "checkpoints"
        assert wait_until(lambda: any(p.name.isdigit() for p in saved.glob("*")))
        first.engine.stop()  # mid-training: the loop ends after the step it is running
    with serving(checkpoint("llama"), state) as second:
        yield SimpleNamespace(life=second, done=done, before=before, cut=cut)


@pytest.mark.slow  # two lives of the server, each compiling its programs
def test_a_job_cut_short_by_a_restart_resumes_from_its_checkpoint(restarted):
    client = restarted.life.client
    done = finished(client, restarted.cut.id)
    assert (done.status, done.error) == ("succeeded", None)
    log = messages(client, done.id)
    resumed = [m for m in log if m.startswith("Resumed from the checkpoint of step ")]
    assert len(resumed) == 1 and 0 < int(resumed[0].rsplit(" ", 1)[1]) < CUT_STEPS
    assert f"Trained {CUT_STEPS} steps" in " ".join(log)  # no more, no fewer


@pytest.mark.slow  # two lives of the server, each compiling its programs
def test_a_succeeded_jobs_adapter_is_served_again_after_a_restart(restarted):
    life, done = restarted.life, restarted.done
    assert life.client.fine_tuning.jobs.retrieve(done.id) == done
    assert wait_until(lambda: done.fine_tuned_model in life.engine.adapters())
    after = served_answer(life.client, done.fine_tuned_model)
    assert after.text == restarted.before.text
    assert after.logprobs.token_logprobs == pytest.approx(restarted.before.logprobs.token_logprobs)
