"""Specification of the unified arena (harli_jax.memory.arena): arrays round-trip through pages
untouched, the programs that take the arena alias it (no copy), and micro-steps that keep their
state in arena pages compute exactly the one-program train step."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_lora_train import (
    LAYERS,
    ROWS,
    SEQ,
    base,  # noqa: F401  (a fixture)
    lora_model,
    one_program_step,  # noqa: F401  (a fixture)
    packed_batch,
    parameters,
    trainer_for,
)

from harli_jax import LLM, SamplingParams
from harli_jax.memory.arena import Arena, load, pages_for, store, zero
from harli_jax.memory.kv_cache import KVCache
from harli_jax.memory.page_table import Owner
from harli_jax.memory.sizing import arena_pages, check_memory_fraction

SHAPE = (3, 11, 4, 2, 5)  # layers, pages, page_size, kv_heads, head_dim: 240 words a page


@pytest.mark.parametrize("arena_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(
    "dtype, shape",
    [(jnp.float32, (7, 33)), (jnp.bfloat16, (5, 51)), (jnp.int32, (241,)), (jnp.float32, ())],
)
def test_arrays_round_trip_through_pages_leaving_other_pages_alone(arena_dtype, dtype, shape):
    if dtype == jnp.int32 and arena_dtype == jnp.bfloat16:
        pytest.skip("integers go into f32 arenas only (see the CPU caveat below)")
    rng = np.random.default_rng(0)
    arena = Arena(KVCache.zeros(*SHAPE, dtype=arena_dtype))
    before = jax.random.normal(jax.random.key(1), arena.buffer.k.shape).astype(arena_dtype)
    buffer = arena.buffer._replace(k=before, v=-before)
    before = np.asarray(before)  # the buffer is donated below
    if jnp.issubdtype(dtype, jnp.integer):
        x = rng.integers(-(2**31), 2**31 - 1, shape).astype(dtype)
    else:
        x = rng.normal(size=shape).astype(dtype)
    n = pages_for(x, buffer)
    pages = jnp.asarray([9, 2, 5, 7][:n], jnp.int32)
    assert n <= 4

    after = jax.jit(store, donate_argnums=0)(buffer, pages, x)
    got = load(after, pages, jax.ShapeDtypeStruct(shape, dtype))

    if jnp.dtype(dtype).itemsize > jnp.dtype(arena_dtype).itemsize:
        # XLA's CPU backend scatters bf16 through f32, quieting NaN-patterned halves: the last
        # ~16 bits of a few values may differ (see arena.store).
        np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=2**-15)
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    others = np.setdiff1d(np.arange(SHAPE[1]), np.asarray(pages))
    np.testing.assert_array_equal(np.asarray(after.k)[:, others], before[:, others])
    np.testing.assert_array_equal(np.asarray(after.v)[:, others], -before[:, others])


def test_trees_of_leaves_share_pages_and_zero_clears_them():
    arena = Arena(KVCache.zeros(*SHAPE, dtype=jnp.bfloat16))
    tree = [jnp.arange(120, dtype=jnp.float32), jnp.ones((3, 3), jnp.int32)]
    assert arena.pages_for(tree) == 2  # 240 + 18 bf16 words, 240 a page
    pages = jnp.asarray([3, 4], jnp.int32)
    buffer = store(arena.buffer, pages, tree)
    got = load(buffer, pages, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in tree])
    for a, b in zip(got, tree, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.any(np.asarray(zero(buffer, pages).k))
    with pytest.raises(ValueError, match="do not fit"):
        store(arena.buffer, pages[:1], tree)


def test_sizing_follows_the_memory_fraction():
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="--memory-fraction"):
            check_memory_fraction(bad)

    class Device:
        def memory_stats(self):
            return {"bytes_limit": 1000, "bytes_in_use": 300}

    assert arena_pages(0.9, page_bytes=100, temporaries=150, device=Device()) == 4
    assert arena_pages(0.5, page_bytes=100, temporaries=500, device=Device()) == 0
    assert arena_pages(0.9, 100, 0, device=jax.devices("cpu")[0]) is None  # CPU: no stats


# -- aliasing: no program copies the arena ------------------------------------------------------


def arena_is_aliased(hlo: str, shape: tuple[int, ...]) -> bool:
    """Every arena-shaped parameter is aliased to an output, and no copy makes an arena."""
    dims = ",".join(map(str, shape))
    entry = hlo[hlo.index("ENTRY") :]
    params = {
        int(m.group(1))
        for m in re.finditer(rf"\w+\[{dims}\]\S* parameter\((\d+)\)", entry)
        if re.search(rf"\[{dims}\]", m.group(0))
    }
    header = hlo.split("\n", 1)[0]
    aliased = {int(m.group(1)) for m in re.finditer(r"\}: \((\d+), \{", header)}
    copies = re.findall(rf"= \w+\[{dims}\]\S* copy\(", hlo)
    return len(params) == 2 and params <= aliased and not copies


def test_the_decode_program_aliases_the_arena():
    llm = LLM.demo(max_num_seqs=2, max_model_len=64, page_size=16, max_loras=0)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    shape = llm.engine.cache.k.shape
    programs = llm.engine._programs
    decode = [key for key in programs if "/t1/" in key]
    assert decode and all(arena_is_aliased(programs[k].as_text(), shape) for k in programs)


def arena_trainer(model, num_pages: int = 64) -> tuple:
    config = model.config
    arena = Arena(
        KVCache.zeros(
            config.num_layers, num_pages, 8, config.num_kv_heads, config.head_dim, jnp.float32
        )
    )
    trainer = trainer_for(model)
    trainer.use_arena(arena, Owner("finetune", "job"))
    return trainer, arena


@pytest.mark.parametrize(
    "token_chunks, layer_spans, num_pages, mode",
    [
        # An arena with room keeps the spans' residuals; a small one recomputes them.
        (2, [(0, 1), (1, 2), (2, 3), (3, 4)], 256, "kept"),
        (2, [(0, 1), (1, 2), (2, 3), (3, 4)], 64, "recomputed"),
        pytest.param(1, [(0, LAYERS)], 256, "kept", marks=pytest.mark.slow),
        pytest.param(2, [(0, 1), (1, 3), (3, 4)], 64, "recomputed", marks=pytest.mark.slow),
    ],
)
def test_micro_steps_in_the_arena_compute_the_one_program_step(
    base,  # noqa: F811
    one_program_step,  # noqa: F811
    token_chunks,
    layer_spans,
    num_pages,
    mode,
):
    expected_params, expected_loss = one_program_step
    trainer, arena = arena_trainer(lora_model(base), num_pages)

    plan = trainer.plan(packed_batch(), token_chunks, layer_spans)
    assert trainer._arena_steps.mode == mode
    metrics = trainer.run_plan(plan)

    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-6)
    for got, want in zip(parameters(trainer), expected_params, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert arena.pages.used_by("finetune") > 0  # the lease stays for the next step
    trainer.release()
    assert arena.pages.used_by("finetune") == 0


@pytest.mark.parametrize("num_pages", [64, 256])  # residuals recomputed, kept
def test_train_micro_step_programs_alias_the_arena_and_abandoned_plans_stop(
    base,  # noqa: F811
    num_pages,
):
    trainer, arena = arena_trainer(lora_model(base), num_pages)
    plan = trainer.plan(packed_batch(), 2, [(0, 1), (1, 3), (3, 4)])
    trainer.run_plan(plan)
    keys = {step.key for step in plan}
    assert {key[0] for key in keys} == {"fwd", "head", "bwd", "update"}
    for key in {*keys, ("start", ROWS, SEQ, 2)}:  # and the step's start (clears, cuts the batch)
        assert arena_is_aliased(trainer.executable(key).as_text(), arena.buffer.k.shape), key

    plan = trainer.plan(packed_batch(1), 2, [(0, 1), (1, 3), (3, 4)])
    plan.steps[0].run()
    trainer.release()
    with pytest.raises(RuntimeError, match="abandoned"):
        plan.steps[1].run()
    assert not trainer.reserve(ROWS, SEQ, 2, [(0, 1), (1, 3), (3, 4)]) or trainer.holds_pages
