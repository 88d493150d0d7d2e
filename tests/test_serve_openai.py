"""The server through the official `openai` client, on 127.0.0.1: each answer is what the engine
generates for the same request through the library, in OpenAI's shapes. (Fine-tuning through the
same client: test_serve_finetune.py.)"""

from __future__ import annotations

import time

import httpx
import numpy as np
import openai
import pytest
from flax import nnx

from harli_jax import LLM, SamplingParams
from harli_jax.engine.loop import Engine
from harli_jax.lora.config import LoraConfig
from harli_jax.lora.inject import lora_layers
from harli_jax.serve import BackgroundServer, create_app

MODEL = "tiny-llama"
PROMPT = "The cat sat on"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def served(checkpoint):
    llm = LLM(
        checkpoint("llama"), dtype="float32", max_model_len=128, page_size=128, max_num_seqs=2
    )
    engine = Engine(llm.engine, max_queued=16).start()
    with BackgroundServer(create_app(engine, MODEL)) as server:
        yield server, engine, llm.tokenizer
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
    _, engine, tokenizer = served
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
    _, engine, tokenizer = served
    prompts = [tokenizer.encode("Once upon"), tokenizer.encode("A dog")]
    expected = [library(engine, p, max_tokens=4, temperature=0.0).text for p in prompts]
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected


def test_n_seeded_choices_sample_with_seed_plus_i(served, client):
    _, engine, tokenizer = served
    prompt_ids = tokenizer.encode(PROMPT)
    expected = [
        library(engine, prompt_ids, max_tokens=5, temperature=1.0, seed=41 + i).text
        for i in range(3)
    ]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=3, seed=41)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected


@pytest.mark.parametrize(
    ("wire", "params"),
    [
        (dict(presence_penalty=1.5, frequency_penalty=1), {}),  # an int, as JSON allows
        (dict(logit_bias={"40": 5, "41": -100}), dict(logit_bias={40: 5.0, 41: -100.0})),
    ],
)
def test_penalties_and_logit_bias_reach_the_engine(served, client, wire, params):
    _, engine, tokenizer = served
    prompt_ids = tokenizer.encode(PROMPT)
    plain = library(engine, prompt_ids, max_tokens=16, temperature=0.0)
    expected = library(engine, prompt_ids, max_tokens=16, temperature=0.0, **(params or wire))
    assert expected.text != plain.text  # else this test could not tell them apart
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, **wire
    )
    assert got.choices[0].text == expected.text


def test_unimplemented_openai_fields_that_ask_for_nothing_are_accepted(served, client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    asks_nothing = dict(logit_bias={}, best_of=1, echo=False)
    inert = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, **asks_nothing
    )
    assert inert.choices[0].text == plain.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, response_format={"type": "text"}, tools=[]
    )
    assert chat.choices[0].message.content is not None


@pytest.mark.parametrize("extension", [{"top_k": 2}, {"min_p": 0.3}])
def test_vllms_sampling_extensions_reach_the_engine(served, client, extension):
    _, engine, tokenizer = served
    prompt_ids = tokenizer.encode(PROMPT)
    seeds = range(5, 9)
    expected = [
        library(engine, prompt_ids, max_tokens=8, temperature=1.0, seed=s, **extension).text
        for s in seeds
    ]
    unrestricted = [
        library(engine, prompt_ids, max_tokens=8, temperature=1.0, seed=s).text for s in seeds
    ]
    assert expected != unrestricted  # else this test could not tell the field was dropped
    got = [
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, seed=s, extra_body=extension
        )
        .choices[0]
        .text
        for s in seeds
    ]
    assert got == expected


def test_stop_token_ids_as_vllms_extension_end_the_output(served, client):
    _, engine, tokenizer = served
    prompt_ids = tokenizer.encode(PROMPT)
    free = library(engine, prompt_ids, max_tokens=12, temperature=0.0, ignore_eos=True)
    stop = free.token_ids[3]
    expected = library(
        engine, prompt_ids, max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop]
    )
    assert expected.finish_reason == "stop" and len(expected.token_ids) <= 4
    got = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop]},
    )
    assert (got.choices[0].text, got.choices[0].finish_reason) == (expected.text, "stop")


def test_stop_string_ends_the_text_before_it(served, client):
    _, engine, tokenizer = served
    full = library(engine, tokenizer.encode(PROMPT), max_tokens=12, temperature=0.0).text
    stop = full[len(full) // 2 :][:2]
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert got.choices[0].text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_completion_logprobs_are_the_engines(served, client):
    _, engine, tokenizer = served
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
    _, engine, tokenizer = served
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
    _, engine, tokenizer = served
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
    _, engine, tokenizer = served
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


def test_metrics_export_served_requests_and_the_engine_snapshot(served, client):
    server, engine, _ = served
    before = _scrape(server.url)
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    after = _scrape(server.url)
    served_key = 'harli_requests_total{endpoint="completions",outcome="length"}'
    assert after[served_key] == before.get(served_key, 0) + 1
    assert after["harli_time_to_first_token_seconds_count"] >= 1
    snapshot = engine.metrics_snapshot()  # idle now, so as it was at the scrape
    assert after["harli_finetune_tokens_total"] == snapshot.finetune_tokens
    for owner, pages in snapshot.arena_pages.items():
        assert after[f'harli_arena_pages{{owner="{owner}"}}'] == pages


def _scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    samples = [line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")]
    return {name: float(value) for name, value in samples}


def test_a_deleted_fine_tuned_model_is_no_longer_listed_or_served(served, client):
    """DELETE /v1/models/{id}: a served adapter goes, the base model and unknown ids are
    refused as OpenAI refuses them."""
    _, engine, _ = served
    model = nnx.merge(engine.core.graphdef, engine.core.state)
    rng = np.random.default_rng(0)
    weights = {
        path: (
            rng.normal(size=(layer.lora_a.shape[1], 4)),
            rng.normal(size=(4, layer.lora_b.shape[2])),
        )
        for path, layer in lora_layers(model).items()
        if path.endswith("q_proj")
    }
    config = LoraConfig(r=4, alpha=8, target_modules=("q_proj",))
    engine.call_soon(lambda: engine.core.load_adapter("ft:tiny:x", weights, config))
    deadline = time.monotonic() + 30
    while "ft:tiny:x" not in engine.adapters() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.completions.create(model="ft:tiny:x", prompt=PROMPT, max_tokens=2).choices

    deleted = client.models.delete("ft:tiny:x")

    assert (deleted.id, deleted.deleted) == ("ft:tiny:x", True)
    assert "ft:tiny:x" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ft:tiny:x", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.delete("ft:tiny:x")
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete(MODEL)
