"""Specification of LoRA training: micro-step plans compute exactly the one-program step, the loss
falls, steady state never compiles, and the frozen base weights are shared, never donated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compilations import counting_compilations
from flax import nnx

from harli_jax.lora.config import LoraConfig
from harli_jax.lora.inject import inject_lora, lora_layers
from harli_jax.lora.train import ProgramCache, Trainer, loss_fn
from harli_jax.models.loading import from_pretrained

LAYERS = 4
ROWS, SEQ = 4, 16
CONFIG = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj", "down_proj"))
# Plain SGD: the update is the gradient itself, with no Adam-style amplification of rounding.
SGD = optax.sgd(0.1)
# Trainers here share compiled programs, as a job's restarts would; each still checks its own.
PROGRAMS = ProgramCache()


def trainer_for(model: nnx.Module, optimizer=SGD) -> Trainer:
    return Trainer(model, optimizer, programs=PROGRAMS)


@pytest.fixture(scope="module")
def base(checkpoint):
    return from_pretrained(checkpoint("llama", num_hidden_layers=LAYERS), dtype=jnp.float32)


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows packed with examples of random lengths (segments 1, 2, ...), padding at the end."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((ROWS, SEQ), np.int32) for k in ("segment_ids", "positions")}
    for row in range(ROWS):
        start, segment = 0, 1
        while start < SEQ - 3:
            length = int(rng.integers(3, 9))
            span = slice(start, min(start + length, SEQ - row))
            batch["segment_ids"][row, span] = segment
            batch["positions"][row, span] = np.arange(span.stop - span.start)
            start, segment = span.stop, segment + 1
    batch["tokens"] = rng.integers(7, 500, (ROWS, SEQ)).astype(np.int32)
    batch["targets"] = rng.integers(7, 500, (ROWS, SEQ)).astype(np.int32)
    batch["loss_mask"] = ((rng.random((ROWS, SEQ)) < 0.8) & (batch["segment_ids"] > 0)).astype(
        np.int32
    )
    return batch


def lora_model(base: nnx.Module) -> nnx.Module:
    """The base weights with a rank-4 adapter whose B is non-zero, so every LoRA weight learns."""
    model = inject_lora(nnx.merge(*nnx.split(base)), CONFIG, rngs=nnx.Rngs(0))
    for i, layer in enumerate(lora_layers(model).values()):
        layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    return model


def parameters(trainer: Trainer) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(trainer.lora)]


@pytest.fixture(scope="module")
def one_program_step(base):
    """Parameters and metrics after one unsplit step (SGD: the update is the gradient)."""
    trainer = trainer_for(lora_model(base))
    metrics = trainer.train_step(packed_batch())
    return parameters(trainer), float(metrics["loss"])


@pytest.mark.parametrize(
    "token_chunks, layer_spans",
    [
        (2, [(0, 1), (1, 2), (2, 3), (3, 4)]),
        (2, [(0, 1), (1, 3), (3, 4)]),
        # Each of these compiles its own programs: a few seconds apiece on a small CPU.
        pytest.param(1, [(0, LAYERS)], marks=pytest.mark.slow),
        pytest.param(4, [(0, LAYERS)], marks=pytest.mark.slow),
        pytest.param(2, [(0, 2), (2, 4)], marks=pytest.mark.slow),
        pytest.param(1, [(0, 3), (3, 4)], marks=pytest.mark.slow),
    ],
)
def test_any_micro_step_split_computes_the_one_program_step(
    base, one_program_step, token_chunks, layer_spans
):
    expected_params, expected_loss = one_program_step
    trainer = trainer_for(lora_model(base))

    metrics = trainer.run_plan(trainer.plan(packed_batch(), token_chunks, layer_spans))

    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-6)
    for got, want in zip(parameters(trainer), expected_params, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_the_trainer_loss_is_the_masked_mean_cross_entropy(base):
    model, batch = lora_model(base), packed_batch()
    graphdef, state = nnx.split(model)

    @jax.jit
    def log_softmax(state):
        model = nnx.merge(graphdef, state)
        hidden, _ = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
        return jax.nn.log_softmax(model.logits(hidden)), loss_fn(model, batch)

    log_probs, loss = log_softmax(state)
    log_probs = np.asarray(log_probs)
    picked = np.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    expected = -(picked * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_loss_falls_on_a_repeated_batch(base):
    trainer = trainer_for(lora_model(base))
    batch = packed_batch(seed=1)

    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(20)]

    assert losses[-1] < 0.5 * losses[0]


def test_steady_state_never_compiles(base):
    trainer = trainer_for(lora_model(base))
    spans = [(0, 1), (1, 2), (2, 3), (3, 4)]
    trainer.run_plan(trainer.plan(packed_batch(0), 2, spans))
    trainer.train_step(packed_batch(0))

    with counting_compilations() as compilations:
        for seed in (1, 2):
            trainer.run_plan(trainer.plan(packed_batch(seed), 2, spans))
            trainer.train_step(packed_batch(seed))

    assert compilations[0] == 0
    # Both middle spans (1, 2) and (2, 3) ran one program: keys hold span length, not position.
    plan = trainer.plan(packed_batch(), 2, spans)
    assert [step.kind for step in plan][:6] == ["fwd", "fwd", "fwd", "fwd", "head", "bwd"]
    assert len({step.key for step in plan}) == 8 < len(plan.steps) == 2 * 9 + 1
    with counting_compilations() as compilations:
        costs = {key: trainer.executable(key).cost_analysis() for key in {s.key for s in plan}}
    assert compilations[0] == 0 and all(costs.values())  # the predictor's view is free


def test_frozen_base_weights_are_the_models_and_survive_steps(base):
    model = lora_model(base)
    weight = model.layers[2].self_attn.q_proj.base.weight[...]
    trainer = trainer_for(model)

    trainer.train_step(packed_batch())
    trainer.run_plan(trainer.plan(packed_batch(), 2, [(0, 1), (1, 2), (2, 3), (3, 4)]))

    frozen = trainer.frozen["layers"][2]["self_attn"]["q_proj"]["base"]["weight"][...]
    assert frozen.unsafe_buffer_pointer() == weight.unsafe_buffer_pointer()
    assert not weight.is_deleted()
    np.testing.assert_array_equal(weight, base.layers[2].self_attn.q_proj.weight[...])


def test_plans_are_validated_and_run_in_order(base):
    trainer = trainer_for(lora_model(base))
    with pytest.raises(ValueError, match="must divide"):
        trainer.plan(packed_batch(), 3, [(0, LAYERS)])
    for spans in ([(0, 2)], [(0, 2), (3, 4)], [(0, 2), (2, 2), (2, 4)], [(1, 4)]):
        with pytest.raises(ValueError, match="contiguous"):
            trainer.plan(packed_batch(), 1, spans)
    plan = trainer.plan(packed_batch(), 1, [(0, LAYERS)])
    with pytest.raises(RuntimeError, match="out of order"):
        plan.steps[1].run()
