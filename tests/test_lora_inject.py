"""Specification of LoRA injection: targets by HF name, frozen shared base weights, the adapter
maths on our decoder and on a user's own NNX model, and multi-adapter serving banks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harli_jax.lora.config import LoraConfig
from harli_jax.lora.inject import (
    adapter_weights,
    clear_slot,
    inject_lora,
    load_adapter_weights,
    lora_layers,
    set_dropout_keys,
    set_slots,
)
from harli_jax.models.llama import Linear
from harli_jax.models.loading import from_pretrained

TOKENS = np.array([[1, 17, 42, 99, 7, 300, 12, 5], [1, 250, 3, 77, 18, 4, 460, 9]])
POSITIONS = np.broadcast_to(np.arange(8), TOKENS.shape)


@pytest.fixture(scope="module")
def base(checkpoint):
    return from_pretrained(checkpoint("llama"), dtype=jnp.float32)


def view(model: nnx.Module) -> nnx.Module:
    """A new module tree over the same weight arrays (nothing is copied)."""
    return nnx.merge(*nnx.split(model))


def logits(model: nnx.Module, tokens=TOKENS, positions=POSITIONS) -> np.ndarray:
    hidden, _ = model(jnp.asarray(tokens), jnp.asarray(positions))
    return np.asarray(model.logits(hidden))


def random_adapter(model: nnx.Module, r: int, seed: int) -> dict:
    """Random (A, B) for every LoRA layer of ``model``, B non-zero, in the peft_io format."""
    rng = np.random.default_rng(seed)
    weights = {}
    for path, layer in lora_layers(model).items():
        _, fan_in, _ = layer.lora_a.shape
        fan_out = layer.lora_b.shape[-1]
        weights[path] = (
            rng.normal(0, 0.3, (fan_in, r)).astype(np.float32),
            rng.normal(0, 0.3, (r, fan_out)).astype(np.float32),
        )
    return weights


def test_injection_wraps_exactly_the_named_modules(base):
    model = inject_lora(
        view(base), LoraConfig(target_modules=("q_proj", "down_proj")), rngs=nnx.Rngs(0)
    )

    expected = {
        f"layers.{i}.{name}" for i in range(2) for name in ("self_attn.q_proj", "mlp.down_proj")
    }
    assert set(lora_layers(model)) == expected
    assert type(model.layers[0].self_attn.k_proj) is Linear
    assert type(model.layers[1].mlp.up_proj) is Linear


def test_a_fresh_adapter_leaves_the_logits_unchanged(base):
    model = inject_lora(view(base), LoraConfig(target_modules="all-linear"), rngs=nnx.Rngs(0))

    layer = model.layers[0].self_attn.q_proj
    assert np.any(np.asarray(layer.lora_a[...]) != 0)  # A is drawn, B = 0: the PEFT init
    np.testing.assert_array_equal(np.asarray(layer.lora_b[...]), 0)
    np.testing.assert_array_equal(logits(model), logits(base))


def test_a_fresh_adapter_is_initialised_like_peft(base):
    model = inject_lora(view(base), LoraConfig(r=8, alpha=32), rngs=nnx.Rngs(0))

    layer = model.layers[1].self_attn.v_proj
    a = np.asarray(layer.lora_a[...])
    assert a.shape == (1, 64, 8)
    # kaiming_uniform(a=sqrt(5)) on a [r, in] weight is U(-1/sqrt(in), 1/sqrt(in)).
    assert np.abs(a).max() <= 1 / np.sqrt(64)
    assert np.abs(a).max() > 0.9 / np.sqrt(64)
    assert float(layer.scaling[...][0]) == 32 / 8


def test_base_weights_are_kept_not_copied(base):
    model = view(base)
    q_proj = model.layers[0].self_attn.q_proj
    weight = q_proj.weight[...]

    inject_lora(model, LoraConfig(), rngs=nnx.Rngs(0))

    wrapped = model.layers[0].self_attn.q_proj
    assert wrapped.base is q_proj
    assert wrapped.base.weight[...] is weight
    _, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    frozen_weight = frozen["layers"][0]["self_attn"]["q_proj"]["base"]["weight"][...]
    assert frozen_weight.unsafe_buffer_pointer() == weight.unsafe_buffer_pointer()
    assert {
        type(v) for v in jax.tree.leaves(lora, is_leaf=lambda x: isinstance(x, nnx.Variable))
    } == {nnx.LoRAParam}


def test_a_loaded_adapter_adds_scaled_low_rank_update(base):
    config = LoraConfig(r=4, alpha=8, target_modules=("v_proj",))
    model = inject_lora(view(base), config, rngs=nnx.Rngs(0))
    weights = random_adapter(model, r=4, seed=0)
    load_adapter_weights(model, weights, config, slot=0)
    x = np.random.default_rng(1).normal(size=(2, 3, 64)).astype(np.float32)

    out = model.layers[1].self_attn.v_proj(jnp.asarray(x))

    a, b = weights["layers.1.self_attn.v_proj"]
    w = np.asarray(base.layers[1].self_attn.v_proj.weight[...])
    np.testing.assert_allclose(out, x @ w.T + 2.0 * (x @ a) @ b, rtol=1e-5, atol=1e-5)
    for path, (a_read, b_read) in adapter_weights(model).items():
        np.testing.assert_array_equal(a_read, weights[path][0])
        np.testing.assert_array_equal(b_read, weights[path][1])


class Block(nnx.Module):
    """A user's own attention-like block, built from flax's nnx.Linear ([in, out] kernels)."""

    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(6, 5, rngs=rngs)
        self.v_proj = nnx.Linear(6, 5, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.q_proj(x)) * self.v_proj(x))


def test_a_users_nnx_linear_model_gets_lora():
    model = Block(nnx.Rngs(0))
    q, v, out = (
        np.asarray(model.q_proj.kernel[...]),
        np.asarray(model.v_proj.kernel[...]),
        np.asarray(model.out.kernel[...]),
    )
    q_bias, out_bias = np.asarray(model.q_proj.bias[...]), np.asarray(model.out.bias[...])
    config = LoraConfig(r=2, alpha=6, target_modules=("q_proj", "v_proj"))

    inject_lora(model, config, rngs=nnx.Rngs(1))
    weights = random_adapter(model, r=2, seed=3)
    load_adapter_weights(model, weights, config, slot=0)
    x = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)

    assert set(lora_layers(model)) == {"q_proj", "v_proj"}
    (qa, qb), (va, vb) = weights["q_proj"], weights["v_proj"]
    q_out = x @ q + q_bias + 3.0 * (x @ qa) @ qb
    v_out = x @ v + 3.0 * (x @ va) @ vb
    expected = (np.tanh(q_out) * v_out) @ out + out_bias
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [3, 8])  # rows >= slots: one-hot over the bank; else: gather
def test_each_row_of_a_bank_matches_its_single_adapter_model(base, slots):
    targets = ("q_proj", "v_proj", "o_proj", "up_proj")
    bank = inject_lora(
        view(base), LoraConfig(r=4, target_modules=targets), slots=slots, rngs=nnx.Rngs(0)
    )
    # Adapter 2 has a smaller rank and different alpha: zero-padded into the rank-4 bank.
    configs = {
        1: LoraConfig(r=4, alpha=8, target_modules=targets),
        2: LoraConfig(r=2, alpha=7, target_modules=targets),
    }
    adapters = {slot: random_adapter(bank, configs[slot].r, seed=slot) for slot in configs}
    for slot, weights in adapters.items():
        load_adapter_weights(bank, weights, configs[slot], slot)
    rows = np.stack([TOKENS[0], TOKENS[1], TOKENS[0]])

    set_slots(bank, jnp.array([0, 1, 2]))
    served = logits(bank, rows, np.broadcast_to(np.arange(8), rows.shape))

    np.testing.assert_array_equal(served[0], logits(base, rows[:1], POSITIONS[:1])[0])
    for slot in (1, 2):
        single = inject_lora(view(base), configs[slot], rngs=nnx.Rngs(0))
        load_adapter_weights(single, adapters[slot], configs[slot], slot=0)
        expected = logits(single, rows[slot : slot + 1], POSITIONS[:1])[0]
        np.testing.assert_allclose(served[slot], expected, rtol=1e-4, atol=1e-4)


def test_a_cleared_slot_serves_the_base_model(base):
    config = LoraConfig(r=2)
    bank = inject_lora(view(base), config, slots=2, rngs=nnx.Rngs(0))
    load_adapter_weights(bank, random_adapter(bank, 2, seed=0), config, slot=1)
    set_slots(bank, jnp.array([1, 1]))
    assert not np.allclose(logits(bank), logits(base))

    clear_slot(bank, 1)

    np.testing.assert_array_equal(logits(bank), logits(base))


def test_dropout_applies_only_when_keys_are_given(base):
    config = LoraConfig(r=4, dropout=0.5)
    model = inject_lora(view(base), config, rngs=nnx.Rngs(0))
    load_adapter_weights(model, random_adapter(model, 4, seed=0), config, slot=0)
    eval_logits = logits(model)
    no_dropout = inject_lora(view(base), LoraConfig(r=4), rngs=nnx.Rngs(0))
    load_adapter_weights(no_dropout, random_adapter(model, 4, seed=0), config, slot=0)
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), 2))

    set_dropout_keys(model, keys)
    train_logits = logits(model)
    set_dropout_keys(model, None)

    np.testing.assert_array_equal(eval_logits, logits(no_dropout))
    assert not np.allclose(train_logits, eval_logits)
    np.testing.assert_array_equal(logits(model), eval_logits)


def test_no_matching_module_is_an_error_naming_what_exists():
    model = Block(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\['gate_proj'\].*q_proj"):
        inject_lora(model, LoraConfig(target_modules=("gate_proj",)), rngs=nnx.Rngs(0))


def test_injecting_twice_is_an_error():
    model = inject_lora(Block(nnx.Rngs(0)), LoraConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoraConfig(), rngs=nnx.Rngs(0))


def test_adapter_weights_that_do_not_fit_are_refused(base):
    model = inject_lora(view(base), LoraConfig(r=2), slots=3, rngs=nnx.Rngs(0))
    fits = random_adapter(model, 2, seed=0)
    with pytest.raises(ValueError, match="exceeds the bank's rank 2"):
        load_adapter_weights(model, random_adapter(model, 4, seed=0), LoraConfig(r=4), slot=1)
    with pytest.raises(ValueError, match=r"expected A \[64, r\] and B \[r, 32\]"):
        path = "layers.0.self_attn.v_proj"
        load_adapter_weights(
            model, {**fits, path: fits["layers.0.self_attn.q_proj"]}, LoraConfig(r=2), slot=1
        )
    with pytest.raises(ValueError, match="no LoRA layer"):
        load_adapter_weights(
            model,
            {"layers.0.mlp.up_proj": fits["layers.0.self_attn.q_proj"]},
            LoraConfig(r=2, target_modules=("up_proj",)),
            slot=1,
        )
    with pytest.raises(ValueError, match="reserved"):
        load_adapter_weights(model, fits, LoraConfig(r=2), slot=0)
    with pytest.raises(ValueError, match="out of range"):
        load_adapter_weights(model, fits, LoraConfig(r=2), slot=3)
