"""The server through the official `openai` client, on 127.0.0.1: each answer is what the engine
generates for the same request through the library, in OpenAI's shapes; and a fine-tuning job
goes from upload to serving its adapter."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from harli_jax import LLM, SamplingParams
from harli_jax.engine.loop import Engine
from harli_jax.serve import BackgroundServer, create_app

MODEL = "tiny-llama"
PROMPT = "The cat sat on"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
# What the engine's metrics_snapshot() reports, stubbed until Engine provides it.
SNAPSHOT = SimpleNamespace(
    num_running=0,
    num_waiting=0,
    queue_wait_seconds=[],
    finetune_tokens=1234,
    arena_pages={"kv": 3, "finetune": 5, "free": 8},
    predictor_errors={"decode": {"mape": 0.05, "p99_rel_error": 0.1, "bias": 0.01}},
)
TRAINING_DATA = b'{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=", "completion": "6"}\n'


@dataclasses.dataclass
class FakeJob:
    id: str
    model: str
    training_file: Path
    hyperparameters: dict
    created_at: int
    status: str = "queued"
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: str | None = None


@dataclasses.dataclass
class FakeEvent:
    id: str
    created_at: int
    level: str
    message: str


class FakeJobs:
    """A `JobService` whose jobs train when the test says so (`finish`), publishing the adapter
    to the engine's list as the real job manager does."""

    def __init__(self, adapters: list[str]):
        self.adapters = adapters
        self.jobs: dict[str, FakeJob] = {}
        self.log: dict[str, list[FakeEvent]] = {}

    def create(self, training_file, model, hyperparameters, suffix):
        job_id = f"ftjob-{len(self.jobs)}"
        resolved = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}
        job = FakeJob(job_id, model, training_file, {**resolved, **hyperparameters}, 1_700_000_000)
        self.jobs[job_id], self.log[job_id] = job, []
        self._event(job, "Job created")
        return job

    def get(self, job_id):
        return self.jobs[job_id]

    def list(self):
        return list(self.jobs.values())

    def cancel(self, job_id):
        job = self.jobs[job_id]
        if job.status in ("succeeded", "failed", "cancelled"):
            raise ValueError(f"{job_id} has already finished")
        job.status = "cancelled"
        self._event(job, "Job cancelled")
        return job

    def events(self, job_id):
        return self.log[job_id]

    def finish(self, job_id: str) -> None:
        job = self.jobs[job_id]
        job.status, job.trained_tokens = "succeeded", 12
        job.finished_at, job.fine_tuned_model = job.created_at + 60, f"ft:{job.model}:{job_id}"
        self.adapters.append(job.fine_tuned_model)
        self._event(job, "Job succeeded")

    def _event(self, job: FakeJob, message: str) -> None:
        log = self.log[job.id]
        log.append(
            FakeEvent(f"ftevent-{job.id}-{len(log)}", job.created_at + len(log), "info", message)
        )


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    llm = LLM(
        checkpoint("llama"), dtype="float32", max_model_len=128, page_size=128, max_num_seqs=2
    )
    engine = Engine(llm.engine, max_queued=16).start()
    adapters: list[str] = []
    engine.adapters = lambda: list(adapters)  # until Engine.adapters() lands
    engine.metrics_snapshot = lambda: SNAPSHOT  # until Engine.metrics_snapshot() lands
    jobs = FakeJobs(adapters)
    files_dir = tmp_path_factory.mktemp("files")
    app = create_app(engine, MODEL, jobs=jobs, files_dir=files_dir)
    with BackgroundServer(app) as server:
        yield server, engine, llm.tokenizer, jobs
    engine.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)


def library(engine, prompt_ids, **params):
    """The reference: the same request through the library, bypassing HTTP."""
    return engine.submit(prompt_ids, SamplingParams(**params)).result()


def chat_prompt(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_completion_is_the_engines_output_with_usage(served, client):
    _, engine, tokenizer, _ = served
    prompt_ids = tokenizer.encode(PROMPT)
    expected = library(engine, prompt_ids, max_tokens=6, temperature=0.0)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert got.choices[0].text == expected.text
    assert got.choices[0].finish_reason == expected.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        len(prompt_ids),
        len(expected.token_ids),
    )


def test_streamed_completion_concatenates_to_the_whole_and_ends_with_usage(served, client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_token_id_prompts_and_batches_give_one_choice_per_prompt(served, client):
    _, engine, tokenizer, _ = served
    prompts = [tokenizer.encode("Once upon"), tokenizer.encode("A dog")]
    expected = [library(engine, p, max_tokens=4, temperature=0.0).text for p in prompts]
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected


def test_n_seeded_choices_sample_with_seed_plus_i(served, client):
    _, engine, tokenizer, _ = served
    prompt_ids = tokenizer.encode(PROMPT)
    expected = [
        library(engine, prompt_ids, max_tokens=5, temperature=1.0, seed=41 + i).text
        for i in range(3)
    ]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=3, seed=41)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected


def test_stop_string_ends_the_text_before_it(served, client):
    _, engine, tokenizer, _ = served
    full = library(engine, tokenizer.encode(PROMPT), max_tokens=12, temperature=0.0).text
    stop = full[len(full) // 2 :][:2]
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert got.choices[0].text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_completion_logprobs_are_the_engines(served, client):
    _, engine, tokenizer, _ = served
    expected = library(engine, tokenizer.encode(PROMPT), max_tokens=4, temperature=0.0, logprobs=3)
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3
    ).choices[0]
    assert got.logprobs.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs])
    assert got.logprobs.tokens == [tokenizer.decode([e.token_id], False) for e in expected.logprobs]
    # Keyed by token text, so tokens with the same text (say, two halves of characters) collide.
    assert got.logprobs.top_logprobs == [
        pytest.approx({tokenizer.decode([t], False): lp for t, lp in e.top.items()})
        for e in expected.logprobs
    ]


def test_chat_renders_the_template_and_answers_as_the_engine(served, client):
    _, engine, tokenizer, _ = served
    prompt_ids = chat_prompt(tokenizer, MESSAGES)
    expected = library(engine, prompt_ids, max_tokens=8, temperature=0.0)
    got = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.text
    assert got.usage.prompt_tokens == len(prompt_ids)


def test_chat_stops_at_the_end_of_turn_token_the_template_closes_turns_with(
    served, client, monkeypatch
):
    _, engine, tokenizer, _ = served
    submitted = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda ids, p, *a: submitted.append(p) or submit(ids, p))
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    # tests/checkpoints.py's template ends every turn with "<|end|>".
    assert submitted[0].stop_token_ids == (tokenizer.token_to_id("<|end|>"),)


def test_streamed_chat_opens_with_the_role_and_concatenates_to_the_whole(served, client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_top_logprobs_are_the_engines(served, client):
    _, engine, tokenizer, _ = served
    expected = library(
        engine, chat_prompt(tokenizer, MESSAGES), max_tokens=3, temperature=0.0, logprobs=2
    )
    got = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    ).choices[0]
    assert [t.logprob for t in got.logprobs.content] == pytest.approx(
        [e.logprob for e in expected.logprobs]
    )
    assert [len(t.top_logprobs) for t in got.logprobs.content] == [2] * len(expected.logprobs)


def test_models_lists_the_base_model(client):
    assert [m.id for m in client.models.list()][0] == MODEL


def test_a_fine_tuning_job_from_upload_to_serving_its_adapter(served, client, monkeypatch):
    _, engine, _, jobs = served
    uploaded = client.files.create(file=("train.jsonl", TRAINING_DATA), purpose="fine-tune")
    assert (uploaded.bytes, uploaded.filename) == (len(TRAINING_DATA), "train.jsonl")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=uploaded.id, hyperparameters={"n_epochs": 2}, seed=5
    )
    assert (job.status, job.training_file, job.hyperparameters.n_epochs) == (
        "queued",
        uploaded.id,
        2,
    )
    assert jobs.get(job.id).training_file.read_bytes() == TRAINING_DATA

    jobs.finish(job.id)  # the trainer's part
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert (done.status, done.fine_tuned_model) == ("succeeded", f"ft:{MODEL}:{job.id}")
    assert done.fine_tuned_model in [m.id for m in client.models.list()]

    submitted = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda ids, p, *a: submitted.append(p) or submit(ids, p))
    answer = client.completions.create(model=done.fine_tuned_model, prompt=PROMPT, max_tokens=2)
    assert answer.model == done.fine_tuned_model
    assert [p.adapter for p in submitted] == [done.fine_tuned_model]

    events = client.fine_tuning.jobs.list_events(job.id)
    assert [e.message for e in events] == ["Job succeeded", "Job created"]


def test_jobs_are_listed_newest_first_across_pages(served, client):
    uploaded = client.files.create(file=("t.jsonl", TRAINING_DATA), purpose="fine-tune")
    for _ in range(3):
        client.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id)
    newest_first = [job.id for job in reversed(served[3].list())]
    assert [job.id for job in client.fine_tuning.jobs.list(limit=2)] == newest_first


def test_cancelling_stops_a_job_once(served, client):
    uploaded = client.files.create(file=("t.jsonl", TRAINING_DATA), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_an_uploaded_file_is_kept_until_deleted(client):
    uploaded = client.files.create(file=("keep.jsonl", TRAINING_DATA), purpose="fine-tune")
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_metrics_export_served_requests_and_the_engine_snapshot(served, client):
    before = _scrape(served[0].url)
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    after = _scrape(served[0].url)
    served_key = 'harli_requests_total{endpoint="completions",outcome="length"}'
    assert after[served_key] == before.get(served_key, 0) + 1
    assert after["harli_time_to_first_token_seconds_count"] >= 1
    assert after["harli_finetune_tokens_total"] == SNAPSHOT.finetune_tokens
    assert after['harli_arena_pages{owner="finetune"}'] == SNAPSHOT.arena_pages["finetune"]
    key = 'harli_predictor_relative_error{family="decode",stat="mape"}'
    assert after[key] == SNAPSHOT.predictor_errors["decode"]["mape"]


def _scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    samples = [line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")]
    return {name: float(value) for name, value in samples}
