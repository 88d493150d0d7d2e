"""Specification of LoRA parity with HF PEFT on torch: an adapter trained there serves the same
logits here, a train step here has PEFT's loss and gradients, and our saved adapter loads there."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

from harli_jax.lora.config import LoraConfig
from harli_jax.lora.inject import adapter_weights, inject_lora, load_adapter_weights
from harli_jax.lora.peft_io import load_adapter, save_adapter
from harli_jax.lora.train import Trainer
from harli_jax.models.loading import from_pretrained

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
TOKENS = np.random.default_rng(0).integers(7, 500, (2, 10))


def hf_model(checkpoint_dir) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, dtype=torch.float32, attn_implementation="eager"
    )


def peft_adapter(checkpoint_dir, out_dir) -> peft.PeftModel:
    """A PEFT model whose adapter has random, non-zero A and B, saved to ``out_dir``."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(hf_model(checkpoint_dir), config)
    model.save_pretrained(out_dir)
    return model


def our_model(checkpoint_dir, adapter_dir) -> nnx.Module:
    weights, config = load_adapter(adapter_dir)
    model = inject_lora(
        from_pretrained(checkpoint_dir, dtype=jnp.float32), config, rngs=nnx.Rngs(0)
    )
    load_adapter_weights(model, weights, config, slot=0)
    return model


def our_logits(model: nnx.Module, tokens: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model(jnp.asarray(tokens), jnp.asarray(positions))
    return np.asarray(model.logits(hidden))


@torch.no_grad()
def torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.as_tensor(tokens)).logits.numpy()


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_peft_adapter_gives_peft_logits(checkpoint, tmp_path, family):
    reference = peft_adapter(checkpoint(family), tmp_path)

    model = our_model(checkpoint(family), tmp_path)

    assert_close(our_logits(model, TOKENS), torch_logits(reference, TOKENS))


def packed_batch() -> dict[str, np.ndarray]:
    """Row 0 packs examples of 7 and 5 tokens; row 1 holds one of 9 and 3 padding slots."""
    rng = np.random.default_rng(1)
    segments = [[7, 5], [9]]
    batch = {k: np.zeros((2, 12), np.int32) for k in ("segment_ids", "positions")}
    for row, lengths in enumerate(segments):
        start = 0
        for segment, length in enumerate(lengths, start=1):
            batch["segment_ids"][row, start : start + length] = segment
            batch["positions"][row, start : start + length] = np.arange(length)
            start += length
    batch["tokens"] = rng.integers(7, 500, (2, 12)).astype(np.int32)
    batch["targets"] = rng.integers(7, 500, (2, 12)).astype(np.int32)
    keep = rng.random((2, 12)) < 0.75
    batch["loss_mask"] = (keep & (batch["segment_ids"] > 0)).astype(np.int32)
    return batch


def peft_loss_and_grads(model: peft.PeftModel, batch) -> tuple[float, dict]:
    """Masked mean cross-entropy with each packed example run on its own, and its gradients as
    ``{module path: (dA [in, r], dB [r, out])}``."""
    total = torch.zeros(())
    for row in range(2):
        for segment in set(batch["segment_ids"][row]) - {0}:
            where = batch["segment_ids"][row] == segment
            tokens = torch.as_tensor(batch["tokens"][row, where], dtype=torch.long)[None]
            logits = model(input_ids=tokens).logits[0]
            targets = torch.as_tensor(batch["targets"][row, where], dtype=torch.long)
            losses = F.cross_entropy(logits, targets, reduction="none")
            total = total + (losses * torch.as_tensor(batch["loss_mask"][row, where])).sum()
    loss = total / int(batch["loss_mask"].sum())
    loss.backward()
    grads: dict[str, list] = {}
    prefix = "base_model.model.model."
    for name, param in model.named_parameters():
        if ".lora_" in name:
            path, half = name[len(prefix) :].split(".lora_")
            grads.setdefault(path, [None, None])["AB".index(half[0])] = param.grad.numpy().T
    return loss.item(), grads


def test_a_train_step_has_peft_loss_and_gradients(checkpoint, tmp_path):
    reference = peft_adapter(checkpoint("llama"), tmp_path)
    # SGD with learning rate 1: the parameters move by exactly minus the gradient.
    trainer = Trainer(our_model(checkpoint("llama"), tmp_path), optax.sgd(1.0))
    before = {
        path: tuple(map(np.asarray, ab)) for path, ab in adapter_weights(trainer.model).items()
    }
    batch = packed_batch()

    metrics = trainer.train_step(batch)

    expected_loss, expected_grads = peft_loss_and_grads(reference, batch)
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    after = adapter_weights(trainer.model)
    assert after.keys() == expected_grads.keys()
    for path, (a, b) in after.items():
        assert_close(before[path][0] - np.asarray(a), expected_grads[path][0])
        assert_close(before[path][1] - np.asarray(b), expected_grads[path][1])


def test_our_saved_adapter_loads_in_peft_with_our_logits(checkpoint, tmp_path):
    config = LoraConfig(r=4, alpha=16, target_modules=("q_proj", "k_proj", "gate_proj"))
    model = inject_lora(
        from_pretrained(checkpoint("llama"), dtype=jnp.float32), config, rngs=nnx.Rngs(0)
    )
    rng = np.random.default_rng(2)
    weights = {
        path: (
            rng.normal(0, 0.2, a.shape).astype(np.float32),
            rng.normal(0, 0.2, b.shape).astype(np.float32),
        )
        for path, (a, b) in adapter_weights(model).items()
    }
    load_adapter_weights(model, weights, config, slot=0)

    save_adapter(tmp_path / "adapter", adapter_weights(model), config)
    reference = peft.PeftModel.from_pretrained(hf_model(checkpoint("llama")), tmp_path / "adapter")

    assert_close(torch_logits(reference, TOKENS), our_logits(model, TOKENS))
