"""Sampler variants: each returns what the full sampler returns for the outputs it computes
(checked bit for bit against the full sampler, and against float64 numpy where a reference
exists), the engine runs the cheapest variant a batch allows, and start-up compilation (in
threads) covers the plain requests' variants."""

from __future__ import annotations

import numpy as np
import pytest

from harli_jax import LLM, SamplingParams
from harli_jax.engine.core import PRECOMPILED_VARIANTS
from harli_jax.engine.sampling import (
    FULL,
    GREEDY,
    PLAIN,
    TOP_LOGPROBS,
    SamplerInputs,
    SamplerVariant,
    pack,
    sample,
    unpack,
)

ROWS, VOCAB = 8, 96


def _logits() -> np.ndarray:
    return (np.random.default_rng(3).normal(size=(ROWS, VOCAB)) * 3).astype(np.float32)


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _inputs(params: list[SamplingParams]) -> SamplerInputs:
    return SamplerInputs.build(params, list(range(11, 11 + ROWS)), [0, 3, 1, 4, 1, 5, 9, 2], ROWS)


# Batches each variant serves: a mix of what it covers (greedy rows ride in drawing batches).
BATCHES = {
    GREEDY: [SamplingParams(temperature=0.0)] * ROWS,
    PLAIN: [SamplingParams(temperature=t) for t in (0.0, 0.7, 1.0, 1.3) * 2],
    SamplerVariant(restrict=True, draw=True, top_logprobs=False): [
        SamplingParams(temperature=0.8, top_k=k, top_p=p, min_p=m)
        for k, p, m in ((0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.6, 0.0), (3, 0.9, 0.0))
        + ((0, 1.0, 0.2), (4, 1.0, 0.05), (0, 0.7, 0.3), (0, 1.0, 0.0))
    ],
    SamplerVariant(restrict=False, draw=False, top_logprobs=True): [
        SamplingParams(temperature=0.0, logprobs=n) for n in (0, 1, 5, 2) * 2
    ],
    FULL: [
        SamplingParams(temperature=t, top_k=k, logprobs=n)
        for t, k, n in ((0.0, 0, 5), (1.0, 4, 0), (0.9, 0, None), (1.1, 2, 3)) * 2
    ],
}


@pytest.mark.parametrize("variant", list(BATCHES), ids=lambda v: v.suffix)
def test_each_variant_equals_the_full_sampler_on_what_it_returns(variant):
    params = BATCHES[variant]
    assert SamplerVariant.of(params) == variant
    logits, inputs = _logits(), _inputs(params)
    full = sample(logits, inputs, FULL)
    got = sample(logits, inputs, variant)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(full.tokens))
    np.testing.assert_array_equal(np.asarray(got.logprobs), np.asarray(full.logprobs))
    if variant.top_logprobs:
        np.testing.assert_array_equal(np.asarray(got.top_ids), np.asarray(full.top_ids))
        np.testing.assert_array_equal(np.asarray(got.top_logprobs), np.asarray(full.top_logprobs))
    else:  # not computed, so nothing to read back
        assert got.top_ids is None and got.top_logprobs is None
    # Against float64: the chosen token's logprob, greedy rows' argmax, the top alternatives.
    reference = _log_softmax64(logits)
    tokens = np.asarray(got.tokens)
    np.testing.assert_allclose(got.logprobs, reference[np.arange(ROWS), tokens], atol=1e-5)
    greedy = np.array([p.temperature == 0 for p in params])
    np.testing.assert_array_equal(tokens[greedy], np.argmax(reference, axis=-1)[greedy])
    if variant.top_logprobs:
        order = np.argsort(-reference, axis=-1)[:, :TOP_LOGPROBS]
        np.testing.assert_array_equal(np.asarray(got.top_ids), order)
        np.testing.assert_allclose(
            got.top_logprobs, np.take_along_axis(reference, order, axis=-1), atol=1e-5
        )


def test_seeded_draws_do_not_depend_on_the_rest_of_the_batch():
    logits = _logits()
    params = [SamplingParams(temperature=1.0)] * ROWS
    together = np.asarray(sample(logits, _inputs(params), PLAIN).tokens)
    inputs = _inputs(params)
    for row in range(ROWS):
        alone = SamplerInputs(*(np.asarray(x)[row : row + 1] for x in inputs))
        assert np.asarray(sample(logits[row : row + 1], alone, PLAIN).tokens)[0] == together[row]


@pytest.mark.parametrize(
    "params, variant",
    [
        ([SamplingParams(temperature=0.0)], GREEDY),
        ([SamplingParams(temperature=0.0, top_k=3, top_p=0.5)], GREEDY),  # top-k: draws only
        ([SamplingParams(temperature=0.0, logprobs=0)], GREEDY),  # the token's own: always
        ([SamplingParams(temperature=0.5), SamplingParams(temperature=0.0)], PLAIN),
        ([SamplingParams(temperature=0.5, top_p=0.9)], SamplerVariant(True, True, False)),
        ([SamplingParams(temperature=0.0, logprobs=1)], SamplerVariant(False, False, True)),
    ],
)
def test_the_variant_is_the_cheapest_that_serves_the_batch(params, variant):
    assert SamplerVariant.of(params) == variant


def _keys_run(llm: LLM, params: SamplingParams) -> set[str]:
    core, keys = llm.engine, set()
    core.add_request([5, 6, 7, 8], params)
    while core.has_unfinished():
        core.step()
        keys |= set(core.last_report.key.split("+")) if core.last_report else set()
    return keys


def test_the_engine_runs_the_cheapest_variant(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32", max_num_seqs=2, max_model_len=32)
    run = lambda **kw: _keys_run(llm, SamplingParams(max_tokens=3, **kw))  # noqa: E731
    assert {k.rsplit("/", 1)[1] for k in run(temperature=0.0)} == {"greedy"}
    assert {k.rsplit("/", 1)[1] for k in run(temperature=1.0)} == {"draw"}
    assert {k.rsplit("/", 1)[1] for k in run(temperature=1.0, top_k=2)} == {"draw-topkp"}
    assert {k.rsplit("/", 1)[1] for k in run(temperature=0.0, logprobs=2)} == {"top"}


def test_compile_all_in_threads_covers_plain_requests(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32", max_num_seqs=2, max_model_len=32)
    core, reports = llm.engine, []
    core.compile_all(lambda done, total: reports.append((done, total)), workers=2)
    buckets = core.shape_buckets()
    assert reports == [(i + 1, len(buckets)) for i in range(len(buckets))]
    assert len(core._programs) == len(buckets) * len(PRECOMPILED_VARIANTS)
    compiled = dict(core._programs)
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=10, temperature=temperature, ignore_eos=True)
        llm.generate([[5, 6, 7], list(range(3, 20))], params)
    assert core._programs == compiled  # nothing compiled while serving
    serial = LLM(checkpoint("llama"), dtype="float32", max_num_seqs=2, max_model_len=32)
    serial.engine.compile_all(workers=1)
    assert set(serial.engine._programs) == set(compiled)
    assert serial.engine.program_costs == core.program_costs


def test_compile_all_runs_each_program_on_the_scratch_page_only(checkpoint):
    """A program's first run loads its kernels; compile_all takes that run off the first
    request's TPOT without touching a page a request could own."""
    warmed = LLM(checkpoint("llama"), dtype="float32", max_num_seqs=2, max_model_len=32)
    warmed.engine.compile_all(workers=1)
    k, v = np.asarray(warmed.engine.cache.k), np.asarray(warmed.engine.cache.v)
    assert k[:, 0].any() and v[:, 0].any()  # the padding rows ran, writing the scratch page
    assert not k[:, 1:].any() and not v[:, 1:].any()
    cold = LLM(checkpoint("llama"), dtype="float32", max_num_seqs=2, max_model_len=32)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(3, 20))]
    got = [o.token_ids for o in warmed.generate(prompts, params)]
    assert got == [o.token_ids for o in cold.generate(prompts, params)]


@pytest.mark.parametrize("variant", [PLAIN, FULL], ids=lambda v: v.suffix)
def test_packed_samples_unpack_exactly(variant):
    params = BATCHES[variant]
    sampled = sample(_logits(), _inputs(params), variant)
    unpacked = unpack(np.asarray(pack(sampled)), variant)
    for got, want in zip(unpacked, sampled):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(got, np.asarray(want))
            assert got.dtype == want.dtype
