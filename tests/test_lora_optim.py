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

    np.testing.assert_allclose(accumulated, run(make_optimizer(LR, TOTAL, WARMUP), params, means),
                               rtol=1e-6, atol=1e-7)


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
