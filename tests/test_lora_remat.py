"""Specification of the whole train step's layer rematerialisation (`Trainer(remat=True)`): the
same loss and gradients as without it, from a program that keeps only the layers' inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from harli_jax.lora.config import LoraConfig
from harli_jax.lora.inject import inject_lora, lora_layers
from harli_jax.lora.train import Trainer, loss_fn
from harli_jax.models.config import ModelConfig
from harli_jax.models.llama import Llama
from harli_jax.models.loading import from_pretrained

LAYERS, ROWS, SEQ = 3, 2, 16
CONFIG = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear")


@pytest.fixture(scope="module")
def base(checkpoint):
    return from_pretrained(checkpoint("llama", num_hidden_layers=LAYERS), dtype=jnp.float32)


def lora_model(base: nnx.Module) -> nnx.Module:
    """The base weights with an adapter whose B is non-zero, so every LoRA weight has a gradient."""
    model = inject_lora(nnx.merge(*nnx.split(base)), CONFIG, rngs=nnx.Rngs(0))
    for i, layer in enumerate(lora_layers(model).values()):
        layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    return model


def batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Two rows, the first packing two examples, the second padded; loss on most tokens."""
    rng = np.random.default_rng(seed)
    segment_ids = np.array([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4], np.int32)
    positions = np.array([list(range(9)) + list(range(7)), list(range(12)) + [0] * 4], np.int32)
    return dict(
        tokens=rng.integers(7, 500, (ROWS, SEQ)).astype(np.int32),
        targets=rng.integers(7, 500, (ROWS, SEQ)).astype(np.int32),
        loss_mask=((rng.random((ROWS, SEQ)) < 0.8) & (segment_ids > 0)).astype(np.int32),
        segment_ids=segment_ids,
        positions=positions,
    )


def test_remat_loss_and_gradients_equal_the_plain_ones(base):
    trainer = Trainer(lora_model(base), optax.sgd(0.1))
    programs, lora, frozen = trainer._p, trainer._lora, trainer._frozen
    arrays = {name: jnp.asarray(value) for name, value in batch().items()}
    key, step = jax.random.key(0), jnp.int32(0)

    @jax.jit
    def value_and_grads(lora):
        def loss(lora):
            model = programs.merged(lora, frozen, key, step, 0, ROWS)
            return loss_fn(model, arrays)

        return jax.value_and_grad(loss)(lora), programs.remat_value_and_grad(
            lora, frozen, arrays, key, step
        )

    (plain_loss, plain_grads), (remat_loss, remat_grads) = value_and_grads(lora)

    assert float(remat_loss) == pytest.approx(float(plain_loss), rel=1e-6)
    assert len(plain_grads) == LAYERS * 7 * 2 and all(np.any(g != 0) for g in plain_grads)
    for got, want in zip(remat_grads, plain_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_remat_train_steps_match_plain_ones_with_dropout(base):
    """Whole steps (dropout on, so the row keys reach every recomputed layer) with AdamW."""
    optimizer = optax.adamw(1e-3)
    plain = Trainer(lora_model(base), optimizer)
    remat = Trainer(lora_model(base), optimizer, remat=True)

    for step in range(2):
        want, got = plain.train_step(batch(step)), remat.train_step(batch(step))
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
        assert float(got["grad_norm"]) == pytest.approx(float(want["grad_norm"]), rel=1e-5)
    for got, want in zip(jax.tree.leaves(remat.lora), jax.tree.leaves(plain.lora), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_remat_keeps_one_layers_activations_not_all_of_them():
    """XLA's own memory analysis of the compiled step: without remat the temporaries grow by a
    layer's activations per layer, with it by little more than one hidden state per layer."""
    rows, seq = 4, 256
    config = ModelConfig(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_layers=8, num_heads=2,
        num_kv_heads=1, head_dim=64,
    )  # fmt: skip
    base = Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, 256, (rows, seq + 1)).astype(np.int32)
    ones = np.ones((rows, seq), np.int32)
    data = dict(
        tokens=ids[:, :-1],
        targets=ids[:, 1:],
        loss_mask=ones,
        segment_ids=ones,
        positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)),
    )
    temp = {}
    for remat in (False, True):
        model = inject_lora(nnx.merge(*nnx.split(base)), LoraConfig(r=8), rngs=nnx.Rngs(0))
        trainer = Trainer(model, optax.sgd(0.1), remat=remat)
        trainer.train_step(data)
        key = ("step", rows, seq, *(("remat",) if remat else ()))
        temp[remat] = trainer.executable(key).memory_analysis().temp_size_in_bytes
    hidden_bytes = rows * seq * config.hidden_size * 2
    # Measured on CPU: 105 MiB without, 27 MiB with remat; (layers + 1) hidden states = 2.25 MiB.
    assert temp[True] < temp[False] / 2
    assert temp[True] < temp[False] - 4 * config.num_layers * hidden_bytes
