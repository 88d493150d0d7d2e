"""The paged decode-attention kernel (through Pallas' interpreter on the CPU) and its XLA reference,
each against attention computed independently in float64 numpy from each row's own keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harli_jax.kernels.paged_attention import (
    Tuning,
    paged_decode_attention,
    paged_decode_attention_reference,
    split_plan,
    use_decode_kernel,
)

LAYERS, LAYER, PAGE = 3, 1, 8


def _case(seed: int, batch: int, heads: int, kv_heads: int, width: int):
    rng = np.random.default_rng(seed)
    pages = batch * width + 1
    shape = (LAYERS, pages, PAGE, kv_heads, 16)
    k_cache, v_cache = rng.standard_normal(shape), rng.standard_normal(shape)
    q = rng.standard_normal((batch, heads, 16))
    table = rng.permutation(np.arange(1, pages)).reshape(batch, width)
    positions = rng.integers(0, width * PAGE, batch)
    positions[0] = width * PAGE - 1  # a full row
    return q, k_cache, v_cache, table, positions


def _numpy_attention(q, k_cache, v_cache, table, positions, window):
    """Row by row: the row's keys in order, those in [position - window + 1, position]."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[3]
    out = np.zeros_like(q)
    for b in range(batch):
        keys = k_cache[LAYER, table[b]].reshape(-1, kv_heads, dim)
        values = v_cache[LAYER, table[b]].reshape(-1, kv_heads, dim)
        lo = 0 if window is None else max(0, positions[b] - window + 1)
        keys, values = keys[lo : positions[b] + 1], values[lo : positions[b] + 1]
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = keys[:, kv] @ q[b, h] / np.sqrt(dim)
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ values[:, kv] / weights.sum()
    return out


# (batch, heads, kv_heads, table width, window): GQA groups of 1, 3 and 4, sliding windows, a
# width that is no power of two, and long single rows that split over several programs.
CASES = [
    (3, 8, 2, 8, None),
    (2, 6, 2, 5, None),
    (4, 4, 4, 6, 13),
    (1, 8, 2, 32, None),
    (1, 8, 2, 32, 50),
]


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "width", "window"), CASES)
def test_kernel_equals_float64_attention_over_each_rows_keys(batch, heads, kv_heads, width, window):
    q, k_cache, v_cache, table, positions = _case(batch * width, batch, heads, kv_heads, width)
    small_splits = Tuning(block_tokens=16, target_programs=64, min_split_tokens=16)
    out = paged_decode_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k_cache, v_cache)),
        LAYER, jnp.asarray(table), jnp.asarray(positions), window,
        tuning=small_splits, interpret=True,
    )  # fmt: skip
    expected = _numpy_attention(q, k_cache, v_cache, table, positions, window)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "width", "window"), CASES[:3])
def test_reference_equals_float64_attention_over_each_rows_keys(
    batch, heads, kv_heads, width, window
):
    q, k_cache, v_cache, table, positions = _case(batch + 100, batch, heads, kv_heads, width)
    out = paged_decode_attention_reference(
        *(jnp.asarray(x, jnp.float32) for x in (q, k_cache, v_cache)),
        LAYER, jnp.asarray(table), jnp.asarray(positions), window,
    )  # fmt: skip
    expected = _numpy_attention(q, k_cache, v_cache, table, positions, window)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


def test_long_rows_of_small_batches_split_and_large_batches_do_not():
    tuning = Tuning()
    assert split_plan(1, 4, 64, 16, tuning) == 8  # 1024 keys: 8 splits of 128
    assert split_plan(128, 4, 64, 16, tuning) == 1  # 512 programs already
    assert split_plan(1, 4, 4, 16, tuning) == 1  # 64 keys: shorter than one split


def test_kernel_is_chosen_only_on_a_single_gpu_unless_forced(monkeypatch):
    monkeypatch.delenv("HARLI_DECODE_ATTENTION", raising=False)
    assert use_decode_kernel(32, 4, 64, 16) is (jax.default_backend() == "gpu")
    monkeypatch.setenv("HARLI_DECODE_ATTENTION", "pallas")
    assert use_decode_kernel(32, 4, 64, 16)
    assert not use_decode_kernel(32, 4, 80, 16)  # head_dim 80: no power of two
    assert not use_decode_kernel(64, 2, 64, 16)  # 32 query heads per kv head: over 16
    monkeypatch.setenv("HARLI_DECODE_ATTENTION", "reference")
    assert not use_decode_kernel(32, 4, 64, 16)


@pytest.mark.parametrize(
    ("family", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 6})]
)
def test_generation_through_the_kernel_equals_the_reference_path(
    checkpoint, monkeypatch, family, overrides
):
    from harli_jax import LLM, SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [list(range(5, 15)), [9, 8, 7]]
    outputs = {}
    for path in ("reference", "pallas"):
        monkeypatch.setenv("HARLI_DECODE_ATTENTION", path)  # read when the step is traced
        llm = LLM(checkpoint(family, **overrides), dtype="float32", page_size=4)
        outputs[path] = llm.generate(prompts, params)
    for ref, fast in zip(outputs["reference"], outputs["pallas"]):
        assert fast.token_ids == ref.token_ids
        np.testing.assert_allclose(
            [lp.logprob for lp in fast.logprobs], [lp.logprob for lp in ref.logprobs], atol=1e-5
        )
