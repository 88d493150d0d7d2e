"""Under load and under clients that leave, the server loses nothing and holds nothing: every
request ends in a completion or a 429, and a stream whose client disconnects is aborted at once."""

from __future__ import annotations

import asyncio
import collections
import json
import time

import httpx
import pytest

from harli_jax import LLM
from harli_jax.engine.loop import Engine
from harli_jax.serve import BackgroundServer, create_app

MODEL = "tiny-llama"
CONTEXT = 256
MAX_QUEUED = 64


@pytest.fixture(scope="module")
def served(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32", page_size=CONTEXT, max_num_seqs=4)
    engine = Engine(llm.engine, max_queued=MAX_QUEUED).start()
    with BackgroundServer(create_app(engine, MODEL)) as server:
        yield server.url, engine
    engine.stop()


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_client_that_leaves_mid_stream_has_its_sequence_aborted(served, monkeypatch):
    url, engine = served
    aborted = []
    abort = engine.core.abort
    monkeypatch.setattr(engine.core, "abort", lambda rid: aborted.append(rid) or abort(rid))
    # Long enough (all of the context) that it cannot finish before the disconnect lands.
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": CONTEXT - 8, "ignore_eos": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response,
    ):
        assert next(response.iter_lines()).startswith("data: ")
    assert wait_until(lambda: engine.num_pending == 0)
    assert len(aborted) == 1


def test_hundreds_of_concurrent_streams_each_end_in_a_completion_or_a_429(served):
    url, engine = served
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "stream": True}
    n = 300

    async def one(client: httpx.AsyncClient) -> str:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                return "rejected"
            assert response.status_code == 200
            events = [line async for line in response.aiter_lines() if line]
        assert events[-1] == "data: [DONE]"
        return json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"]

    async def all_of_them() -> list[str]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(n)))

    before = served_outcomes(url)
    outcomes = collections.Counter(asyncio.run(asyncio.wait_for(all_of_them(), timeout=300)))
    assert set(outcomes) <= {"length", "rejected"} and sum(outcomes.values()) == n
    assert outcomes["length"] >= MAX_QUEUED and outcomes["rejected"] > 0  # it was overloaded
    assert wait_until(lambda: engine.num_pending == 0)
    assert served_outcomes(url) - before == outcomes  # the server counted what clients saw


def served_outcomes(url: str) -> collections.Counter:
    """The server's own count of finished completions, by outcome, from /metrics."""
    prefix = 'harli_requests_total{endpoint="completions",outcome="'
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return collections.Counter(
        {
            line[len(prefix) :].split('"')[0]: int(float(line.rsplit(" ", 1)[1]))
            for line in lines
            if line.startswith(prefix)
        }
    )
