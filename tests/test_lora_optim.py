"""Specification of the fine-tuning optimiser against a numpy AdamW written from the paper."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from harli_jax.lora.optim import make_optimizer, make_schedule

LR, TOTAL, WARMUP = 1e-3, 20, 5


def reference_lr(step: int) -> float:
    """HF get_cosine_schedule_with_warmup, restated."""
    if step < WARMUP:
        return LR * step / WARMUP
    progress = min(1.0, (step - WARMUP) / (TOTAL - WARMUP))
    return LR * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("step", [0, 1, 4, 5, 6, 12, 19, 20, 25])
def test_schedule_is_linear_warmup_then_cosine_to_zero(step):
    schedule = make_schedule(LR, TOTAL, WARMUP)
    assert float(schedule(step)) == pytest.approx(reference_lr(step), rel=1e-5, abs=1e-12)


def reference_adamw(params, grads_seq, *, weight_decay, max_norm, b1=0.9, b2=0.999, eps=1e-8):
    """Clip by global norm, then AdamW (decoupled decay) at the scheduled rate of each step."""
    p, mu, nu = params.copy(), np.zeros_like(params), np.zeros_like(params)
    for t, g in enumerate(grads_seq):
        g = g * min(1.0, max_norm / np.linalg.norm(g))
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        mu_hat, nu_hat = mu / (1 - b1 ** (t + 1)), nu / (1 - b2 ** (t + 1))
        p = p - reference_lr(t) * (mu_hat / (np.sqrt(nu_hat) + eps) + weight_decay * p)
    return p


def run(optimizer: optax.GradientTransformation, params, grads_seq):
    params = jnp.asarray(params)
    state = optimizer.init(params)
    for g in grads_seq:
        updates, state = optimizer.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params)


def test_updates_match_clipped_adamw_reference():
    rng = np.random.default_rng(0)
    params = rng.standard_normal(16).astype(np.float32)
    # Norms around 4: the 1.0 clip is active on every step.
    grads = [rng.standard_normal(16).astype(np.float32) for _ in range(8)]
    optimizer = make_optimizer(LR, TOTAL, WARMUP, weight_decay=0.1, max_grad_norm=1.0)

    got = run(optimizer, params, grads)

    expected = reference_adamw(params, grads, weight_decay=0.1, max_norm=1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_accumulation_applies_the_mean_gradient_once_per_k_calls():
    rng = np.random.default_rng(1)
    params = rng.standard_normal(8).astype(np.float32)
    micro = [rng.standard_normal(8).astype(np.float32) for _ in range(12)]
    means = [(micro[i] + micro[i + 1]) / 2 for i in range(0, 12, 2)]

    accumulated = run(make_optimizer(LR, TOTAL, WARMUP, accumulate_steps=2), params, micro)

    np.testing.assert_allclose(
        accumulated, run(make_optimizer(LR, TOTAL, WARMUP), params, means), rtol=1e-6, atol=1e-7
    )


def test_accumulation_holds_params_between_updates():
    optimizer = make_optimizer(LR, TOTAL, warmup_steps=0, accumulate_steps=3)
    params = {"a": jnp.ones(4)}
    state = optimizer.init(params)
    updates, _ = optimizer.update({"a": jnp.ones(4)}, state, params)
    assert jax.tree.all(jax.tree.map(lambda u: bool(jnp.all(u == 0)), updates))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"total_steps": 0},
        {"warmup_steps": TOTAL},
        {"accumulate_steps": 0},
        {"max_grad_norm": 0.0},
    ],
)
def test_invalid_settings_are_refused(kwargs):
    settings = {"lr": LR, "total_steps": TOTAL, "warmup_steps": WARMUP} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_optimizer(**settings)


def unflattened(weight_decay: float, max_norm: float | None, accumulate_steps: int = 1):
    """make_optimizer's transformation as optax builds it per leaf, without `optax.flatten`."""
    adamw = optax.adamw(make_schedule(LR, TOTAL, WARMUP), weight_decay=weight_decay)
    chain = adamw if max_norm is None else optax.chain(optax.clip_by_global_norm(max_norm), adamw)
    if accumulate_steps == 1:
        return chain
    return optax.MultiSteps(chain, every_k_schedule=accumulate_steps).gradient_transformation()


@pytest.mark.parametrize(
    "weight_decay, max_norm, accumulate_steps",
    [(0.1, 1.0, 1), (0.0, None, 1), (0.01, 1.0, 2)],
)
def test_the_flat_optimizer_updates_a_tree_as_the_per_leaf_one_does(
    weight_decay, max_norm, accumulate_steps
):
    """make_optimizer runs on one flat vector: the same updates, to float32 rounding, on a tree
    of differently shaped leaves (a LoRA state's A and B matrices), with clipping active."""
    rng = np.random.default_rng(2)
    shapes = {"a": (1, 8, 4), "b": (1, 4, 6), "c": {"a": (1, 3, 4), "b": (1, 4, 3)}}
    leaf = lambda shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    params = jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))
    grads_seq = [
        jax.tree.map(lambda p: 3 * leaf(p.shape), params) for _ in range(4 * accumulate_steps)
    ]
    flat = make_optimizer(LR, TOTAL, WARMUP, weight_decay, max_norm, accumulate_steps)
    per_leaf = unflattened(weight_decay, max_norm, accumulate_steps)

    got, want = params, params
    got_state, want_state = flat.init(params), per_leaf.init(params)
    for grads in grads_seq:
        got_updates, got_state = flat.update(grads, got_state, got)
        want_updates, want_state = per_leaf.update(grads, want_state, want)
        got, want = optax.apply_updates(got, got_updates), optax.apply_updates(want, want_updates)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # The state is flat: one vector per moment, not one array per leaf.
    assert len(jax.tree.leaves(got_state)) < len(jax.tree.leaves(want_state))
