"""The device-owning loop: what callers on other threads see."""

from __future__ import annotations

import asyncio
import time

import jax
import pytest

from harli_jax import LLM, SamplingParams
from harli_jax.engine.loop import Engine, QueueFull

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], [8, 9], list(range(10, 30))]


@pytest.fixture
def llm(checkpoint):
    return LLM(checkpoint("llama"), dtype="float32")


def test_streamed_requests_equal_offline_generation(llm):
    offline = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    engine = Engine(llm.engine).start()
    try:
        streams = [engine.submit(p, GREEDY) for p in PROMPTS]
        deltas = [[t for out in s for t in out.new_token_ids] for s in streams]
    finally:
        engine.stop()
    assert deltas == offline
    assert engine.metrics.summary()["requests_finished"] == len(PROMPTS)


def test_async_iteration_gets_every_delta(llm):
    engine = Engine(llm.engine).start()

    async def collect():
        return [t async for out in engine.submit(PROMPTS[0], GREEDY) for t in out.new_token_ids]

    try:
        tokens = asyncio.run(collect())
    finally:
        engine.stop()
    assert tokens == llm.generate([PROMPTS[0]], GREEDY)[0].token_ids


def test_full_queue_refuses_instead_of_blocking(llm):
    engine = Engine(llm.engine, max_queued=2)  # not started: nothing drains
    engine.submit(PROMPTS[0], GREEDY)
    engine.submit(PROMPTS[1], GREEDY)
    with pytest.raises(QueueFull):
        engine.submit(PROMPTS[2], GREEDY)


def test_invalid_request_is_refused_on_the_callers_thread(llm):
    engine = Engine(llm.engine)
    with pytest.raises(ValueError, match="token ids must lie"):
        engine.submit([10**9], GREEDY)
    assert engine.num_pending == 0


def test_abort_frees_the_sequence_pages_at_once(llm):
    engine = Engine(llm.engine).start()
    try:
        stream = engine.submit(PROMPTS[2], SamplingParams(max_tokens=200, ignore_eos=True))
        next(iter(stream))  # it is running
        stream.abort()
        assert not any(out.finished for out in stream)  # the stream ends without finishing
    finally:
        engine.stop()
    assert llm.engine.pages.used_by("kv") == 0
    assert engine.num_pending == 0


class RecordingColocator:
    """Submits one request from inside its first fine-tune turn, as a client thread might while
    fine-tune work runs, and records what the loop tells it afterwards."""

    def __init__(self):
        self.engine = None
        self.calls: list[tuple[int, int]] = []  # (running requests, prefill_tokens) per call
        self.during_steps = self.drains = 0

    def predictor_errors(self):
        return {}

    def during_step(self, running, last):
        self.during_steps += 1
        return None

    def drain(self):
        self.drains += 1
        return None

    def after_step(self, report, prefill_tokens=0):
        if report is not None:
            self.calls.append((self.engine.core.num_running, prefill_tokens))
            if len(self.calls) == 1:
                self.late = self.engine.submit([40, 41, 42], GREEDY)
        return False


def test_an_arrival_during_fine_tune_work_joins_after_the_next_step(llm):
    """The fine-tune work after a step is planned knowing every request the next step admits:
    one submitted during that work waits until the step after it."""
    colocator = RecordingColocator()
    engine = Engine(llm.engine, colocator=colocator)
    colocator.engine = engine
    engine.start()
    try:
        first = engine.submit(PROMPTS[0], GREEDY)
        list(first)
        list(colocator.late)
    finally:
        engine.stop()
    (running_1, prefill_1), (running_2, prefill_2) = colocator.calls[:2]
    assert (running_1, prefill_1) == (1, 0)
    # The late request arrived during the first turn: the second step did not run it, and the
    # loop says the next step will prefill its three prompt tokens.
    assert (running_2, prefill_2) == (1, 3)


def test_a_step_queues_its_first_program_before_waiting_for_earlier_work(llm):
    """Work left queued on the device (the colocator's last fine-tune programs) is waited for
    once the step's own first program is dispatched, so the host's side of the step overlaps
    it; the step's seconds count from when that work ended."""
    core = llm.engine
    core.add_request(PROMPTS[0], GREEDY)
    core.step()  # prefill
    seen, ended = [], []

    def during(running, last):
        seen.append(core.cache is cache_before)  # False: the step's program took the cache
        time.sleep(0.05)  # the queued work ends 50 ms later
        ended.append(time.perf_counter())
        return ended[-1]

    cache_before = core.cache
    core.step(during)
    assert seen == [False]
    assert core.last_report.ended_at - core.last_report.seconds == pytest.approx(ended[0])


def test_the_hook_gets_the_running_program_once_per_step(llm):
    """The hook may use the host while the step's first program runs: it gets an array that
    becomes ready when that program has run, once per step even when the step runs two
    programs (a prefill chunk, then decode), and whether a program of the step follows it."""
    core = llm.engine
    core.add_request(PROMPTS[0], GREEDY)
    core.step()  # the first request's prefill
    core.add_request(PROMPTS[1], GREEDY)
    running = []
    hook = lambda array, last: running.append((jax.block_until_ready(array), last))  # noqa: E731
    outputs = core.step(hook)
    assert "+" in core.last_report.key  # prefill and decode
    assert len(running) == 1 and isinstance(running[0][0], jax.Array)
    assert running[0][1] is False  # the decode program follows the prefill chunk
    assert outputs
    core.step(hook)
    assert "+" not in core.last_report.key and running[1][1] is True


def test_the_loop_hands_each_step_the_colocators_hook(llm):
    colocator = RecordingColocator()
    engine = Engine(llm.engine, colocator=colocator)
    colocator.engine = engine
    engine.start()
    try:
        list(engine.submit(PROMPTS[0], GREEDY))
        list(colocator.late)
    finally:
        engine.stop()
    # One call per step that dispatched a program, and one drain as the loop stops.
    assert colocator.during_steps >= len(colocator.calls)
    assert colocator.drains == 1


def test_the_core_tells_the_prompt_tokens_its_next_prefill_chunk_runs(checkpoint):
    """What the scheduler prices the next step by: the prompt tokens of the first
    `prefill_rows` sequences mid-prompt or waiting, each up to a chunk, as the step then runs
    them (its report's count)."""
    core = LLM(checkpoint("llama"), dtype="float32", prefill_chunk=64).engine
    prompts = [list(range(5, 5 + n)) for n in (3, 2, 70, 4)]
    for prompt in prompts:
        core.add_request(prompt, GREEDY)
    told = core.next_prefill_tokens()
    assert told == 3 + 2 + 64 + 4
    core.step()
    assert core.last_report.features["prefill_tokens"] == told
    assert core.next_prefill_tokens() == 70 - 64  # the long prompt's rest
    core.step()
    assert core.last_report.features["prefill_tokens"] == 70 - 64
    while core.has_unfinished():
        core.step()
    assert core.next_prefill_tokens() == 0
