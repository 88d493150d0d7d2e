"""Bad requests get OpenAI's ``{"error": {...}}`` body with the status that names the problem,
over real HTTP (httpx against uvicorn on 127.0.0.1), and never reach the engine.

The engine here is never started, so a request that slipped through validation would queue
forever: the bounded client timeout turns that into a failure, not a hang."""

from __future__ import annotations

import httpx
import pytest
from serve_fakes import NoJobs

from harli_jax import LLM, SamplingParams
from harli_jax.engine.loop import Engine
from harli_jax.serve import BackgroundServer, create_app

MODEL = "tiny-llama"
CONTEXT = 64
LIMIT = 16 * 1024  # body bytes, for the 413 tests
KEY = "sekret"


@pytest.fixture(scope="module")
def core(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32", max_model_len=CONTEXT, max_num_seqs=2)
    return llm.engine


def idle_engine(core, max_queued: int = 8) -> Engine:
    return Engine(core, max_queued=max_queued)  # not started: nothing it accepts ever runs


@pytest.fixture(scope="module")
def url(core, tmp_path_factory):
    app = create_app(
        idle_engine(core),
        MODEL,
        jobs=NoJobs(),
        files_dir=tmp_path_factory.mktemp("files"),
        max_body_bytes=LIMIT,
        max_upload_bytes=LIMIT,
    )
    with BackgroundServer(app) as server:
        yield server.url


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    return error


def post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(url + path, timeout=10, **kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "5"),
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("temperature", "hot"),
        ("temperature", -0.5),
        ("top_p", 0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", "high"),
        ("logit_bias", {"7": 250}),
        ("logit_bias", {"the": 1}),
        ("top_k", -2),
        ("min_p", 1.5),
        ("min_tokens", -1),
        ("n", 0),
        ("logprobs", 6),
        ("stop", 7),
        ("prompt", [1.5]),
        ("stream", "yes"),
    ],
)
def test_a_field_of_the_wrong_type_or_range_is_422_naming_it(url, field, value):
    body = {"model": MODEL, "prompt": "hi", field: value}
    assert error_of(post(url, "/v1/completions", json=body), 422)["param"] == field


def test_a_chat_message_with_an_unknown_role_is_422(url):
    body = {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}
    error = error_of(post(url, "/v1/chat/completions", json=body), 422)
    assert error["param"] == "messages.0.role"


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "echo", True),
        ("/v1/completions", "suffix", "!"),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}),
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/chat/completions", "tool_choice", "required"),
        ("/v1/completions", "repetition_penalty", 1.2),
    ],
)
def test_an_openai_field_the_server_does_not_implement_is_refused_not_ignored(
    url, path, field, value
):
    body = {"model": MODEL, field: value} | ({"prompt": "hi"} if "chat" not in path else CHAT)
    error = error_of(post(url, path, json=body), 422)
    assert error["param"] == field and "not support" in error["message"]


def test_malformed_json_is_400(url):
    response = post(
        url, "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert error_of(response, 400)["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_an_unknown_model_is_404_model_not_found(url, path, body):
    error = error_of(post(url, path, json={"model": "gpt-17", **body}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")


def test_a_prompt_as_long_as_the_context_is_400(url):
    body = {"model": MODEL, "prompt": [5] * CONTEXT}
    assert "context" in error_of(post(url, "/v1/completions", json=body), 400)["message"]


def test_max_tokens_beyond_the_context_is_400_context_length_exceeded(url):
    body = {"model": MODEL, "prompt": [5] * 10, "max_tokens": CONTEXT - 9}
    error = error_of(post(url, "/v1/completions", json=body), 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")


def test_top_logprobs_without_logprobs_is_400(url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    assert error_of(post(url, "/v1/chat/completions", json=body), 400)["param"] == "top_logprobs"


def test_more_choices_than_the_queue_holds_is_400(url):
    body = {"model": MODEL, "prompt": ["a", "b", "c"], "n": 3}  # 9 choices, queue of 8
    assert error_of(post(url, "/v1/completions", json=body), 400)["param"] == "n"


def test_an_oversized_body_is_413(url):
    body = {"model": MODEL, "prompt": "x" * LIMIT}
    assert error_of(post(url, "/v1/completions", json=body), 413)["code"] == "request_too_large"


def test_an_oversized_chunked_body_is_413_though_it_declares_no_length(url):
    def chunks():
        yield b'{"model": "tiny-llama", "prompt": "'
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = post(url, "/v1/completions", content=chunks())
    assert "content-length" not in response.request.headers
    assert error_of(response, 413)["code"] == "request_too_large"


def test_an_unknown_route_is_404_in_the_same_shape(url):
    error_of(httpx.get(url + "/v1/embeddings", timeout=10), 404)


def test_a_full_queue_is_429_with_retry_after(core):
    engine = idle_engine(core, max_queued=1)
    engine.submit([5, 6, 7], SamplingParams(max_tokens=2))  # fills the queue
    with BackgroundServer(create_app(engine, MODEL)) as server:
        response = post(server.url, "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert error_of(response, 429)["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1


@pytest.fixture(scope="module")
def keyed_url(core):
    with BackgroundServer(create_app(idle_engine(core), MODEL, api_key=KEY)) as server:
        yield server.url


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/openapi.json"])
def test_with_an_api_key_routes_need_it(keyed_url, path, headers):
    response = httpx.get(keyed_url + path, headers=headers, timeout=10)
    assert error_of(response, 401)["code"] == "invalid_api_key"


def test_with_an_api_key_a_bad_request_needs_it_before_anything_else(keyed_url):
    assert post(keyed_url, "/v1/completions", content=b"{").status_code == 401


def test_with_an_api_key_health_is_open_and_the_key_opens_the_rest(keyed_url):
    assert httpx.get(keyed_url + "/health", timeout=10).status_code == 200
    auth = {"Authorization": f"Bearer {KEY}"}
    models = httpx.get(keyed_url + "/v1/models", headers=auth, timeout=10)
    assert [m["id"] for m in models.json()["data"]] == [MODEL]


def test_a_bad_jsonl_upload_is_400_naming_the_line(url):
    data = b'{"text": "fine"}\n{"text": "also fine"}\n{"text": 3}\n'
    response = post(
        url, "/v1/files", files={"file": ("data.jsonl", data)}, data={"purpose": "fine-tune"}
    )
    assert "data.jsonl:3" in error_of(response, 400)["message"]
    assert httpx.get(url + "/v1/files", timeout=10).json()["data"] == []


def test_an_upload_for_another_purpose_is_400(url):
    files = {"file": ("data.jsonl", b'{"text": "fine"}\n')}
    response = post(url, "/v1/files", files=files, data={"purpose": "assistants"})
    assert error_of(response, 400)["param"] == "purpose"


@pytest.mark.parametrize("suffix", ["", "/events"])
def test_an_unknown_job_is_404(url, suffix):
    error_of(httpx.get(url + f"/v1/fine_tuning/jobs/ftjob-nope{suffix}", timeout=10), 404)


def test_cancelling_an_unknown_job_is_404(url):
    error_of(post(url, "/v1/fine_tuning/jobs/ftjob-nope/cancel"), 404)


def test_a_job_on_an_unknown_file_is_400(url):
    body = {"model": MODEL, "training_file": "file-0123456789abcdef01234567"}
    assert error_of(post(url, "/v1/fine_tuning/jobs", json=body), 400)["param"] == "training_file"


def test_a_job_for_another_base_model_is_404(url):
    body = {"model": "gpt-17", "training_file": "file-0123456789abcdef01234567"}
    assert error_of(post(url, "/v1/fine_tuning/jobs", json=body), 404)["code"] == "model_not_found"
