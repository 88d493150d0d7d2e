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

LAYERS, LAYER, DIM = 3, 1, 16
INV_FREQ = 1.0 / 10000.0 ** (np.arange(0, DIM, 2) / DIM)


def _case(seed: int, batch: int, heads: int, kv_heads: int, width: int, page: int):
    rng = np.random.default_rng(seed)
    pages = batch * width + 1
    shape = (LAYERS, pages, page, kv_heads, DIM)
    k_cache, v_cache = rng.standard_normal(shape), rng.standard_normal(shape)
    q = rng.standard_normal((batch, heads, DIM))
    k, v = rng.standard_normal((2, batch, kv_heads, DIM))
    table = rng.permutation(np.arange(1, pages)).reshape(batch, width)
    positions = rng.integers(0, width * page, batch)
    positions[0] = width * page - 1  # a full row
    return q, k, v, k_cache, v_cache, table, positions


def _rotate(x, position):
    """RoPE in float64, rotate-half layout: x [..., DIM] at one position."""
    angles = position * INV_FREQ
    x1, x2 = x[..., : DIM // 2], x[..., DIM // 2 :]
    return np.concatenate(
        [x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1
    )


def _numpy_decode(q, k, v, k_cache, v_cache, table, positions, window):
    """Row by row: rotate, write the new key and value at the row's position in its pages, then
    attend to the row's keys in order, those in [position - window + 1, position]."""
    batch, heads, _ = q.shape
    page, kv_heads = k_cache.shape[2], k_cache.shape[3]
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    out = np.zeros_like(q)
    for b, pos in enumerate(positions):
        k_cache[LAYER, table[b, pos // page], pos % page] = _rotate(k[b], pos)
        v_cache[LAYER, table[b, pos // page], pos % page] = v[b]
        keys = k_cache[LAYER, table[b]].reshape(-1, kv_heads, DIM)
        values = v_cache[LAYER, table[b]].reshape(-1, kv_heads, DIM)
        lo = 0 if window is None else max(0, pos - window + 1)
        keys, values = keys[lo : pos + 1], values[lo : pos + 1]
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = keys[:, kv] @ _rotate(q[b, h], pos) / np.sqrt(DIM)
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ values[:, kv] / weights.sum()
    return out, k_cache, v_cache


def _check(fn, case, window, **kwargs):
    q, k, v, k_cache, v_cache, table, positions = case
    got = fn(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v, k_cache, v_cache)),
        LAYER, jnp.asarray(table), jnp.asarray(positions), jnp.asarray(INV_FREQ, jnp.float32),
        window, **kwargs,
    )  # fmt: skip
    expected = _numpy_decode(q, k, v, k_cache, v_cache, table, positions, window)
    for got_part, expected_part in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got_part), expected_part, rtol=2e-5, atol=2e-5)


# (batch, heads, kv_heads, table width, page size, window): GQA groups of 1, 3 and 4, sliding
# windows, a width that is no power of two, long single rows that split over several programs,
# pages larger than the blocks asked for, and a group of 32 query heads (two tiles of 16 rows).
CASES = [
    (3, 8, 2, 8, 8, None),
    (2, 6, 2, 5, 8, None),
    (4, 4, 4, 6, 8, 13),
    (1, 8, 2, 32, 8, None),
    (1, 8, 2, 32, 8, 50),
    (2, 8, 2, 3, 32, None),
    (2, 64, 2, 4, 8, None),
]


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "width", "page", "window"), CASES)
def test_kernel_writes_and_attends_as_float64_numpy(batch, heads, kv_heads, width, page, window):
    case = _case(batch * width + page, batch, heads, kv_heads, width, page)
    small_blocks = Tuning(block_tokens=16, target_programs=64, min_split_tokens=16)
    _check(paged_decode_attention, case, window, tuning=small_blocks, interpret=True)


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "width", "page", "window"), CASES[:3])
def test_reference_writes_and_attends_as_float64_numpy(batch, heads, kv_heads, width, page, window):
    case = _case(batch + 100, batch, heads, kv_heads, width, page)
    _check(paged_decode_attention_reference, case, window)


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
    assert use_decode_kernel(64, 2, 64, 16)  # 32 query heads per kv head: two row tiles
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
