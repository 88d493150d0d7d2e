"""The decoder against transformers: same logits from the same checkpoint, and loading errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from harli_jax import LLM
from harli_jax.models.config import CheckpointError, ModelConfig

FAMILIES = ["llama", "llama3", "mistral", "qwen2"]


def hf_logits(checkpoint_dir, token_ids: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_sequence_logits_match_transformers(checkpoint, family):
    ckpt = checkpoint(family)
    tokens = list(np.random.default_rng(0).integers(0, 300, size=40))
    ours = LLM(ckpt, dtype="float32").logits([tokens])[0]
    assert ours.shape == (40, ModelConfig.from_dir(ckpt).vocab_size)
    assert rel_err(ours, hf_logits(ckpt, tokens)) < 1e-4


def test_transformers5_config_format_loads_the_same_rope(checkpoint):
    tokens = list(range(3, 70))  # past original_max_position_embeddings, where llama3 scaling acts
    ckpt = checkpoint("llama3", config_format="transformers5")
    assert rel_err(LLM(ckpt, dtype="float32").logits([tokens])[0], hf_logits(ckpt, tokens)) < 1e-4


def test_sharded_checkpoint_loads(checkpoint):
    ckpt = checkpoint("qwen2", sharded=True)
    assert (ckpt / "model.safetensors.index.json").is_file()
    tokens = [5, 17, 99, 3, 250, 8]
    assert rel_err(LLM(ckpt, dtype="float32").logits([tokens])[0], hf_logits(ckpt, tokens)) < 1e-4


def test_batched_scoring_of_unequal_lengths_equals_one_at_a_time(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32")
    seqs = [[1, 2, 3], list(range(10, 40)), [7]]
    batched = llm.logits(seqs)
    for seq, logits in zip(seqs, batched):
        np.testing.assert_allclose(logits, llm.logits([seq])[0], rtol=1e-5, atol=1e-5)


@pytest.fixture
def broken(checkpoint, tmp_path):
    """A writable copy of a good checkpoint, to damage."""
    return shutil.copytree(checkpoint("llama"), tmp_path / "ckpt")


def test_unsupported_architecture_names_config(broken):
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*GPT2LMHeadModel"):
        LLM(broken)


def test_missing_weights_file_names_the_directory(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LLM(broken)


def test_missing_config_is_named(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        LLM(broken)


def test_shape_disagreeing_with_config_names_file_and_tensor(broken):
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp"):
        LLM(broken)


def test_missing_tensor_is_named(broken):
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\..*' is missing"):
        LLM(broken)


@pytest.mark.parametrize("rows", [1, 3])
def test_projection_matches_a_float64_product_on_the_matvec_path(monkeypatch, rows):
    """A one-row projection runs as a multiply-reduce where `MATVEC_BACKENDS` says (the GPU);
    here it is let onto the CPU. Either path is the float64 product, to bf16 rounding."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from harli_jax.models import llama

    monkeypatch.setattr(llama, "MATVEC_BACKENDS", frozenset({jax.default_backend()}))
    linear = llama.Linear(96, 40, bias=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    linear.bias[...] = jnp.linspace(-1, 1, 40, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (rows, 1, 96), jnp.bfloat16)
    expected = np.asarray(x, np.float64) @ np.asarray(linear.weight[...], np.float64).T
    expected += np.asarray(linear.bias[...], np.float64)
    got = np.asarray(jax.jit(linear.__call__)(x), np.float64)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-3)


def test_attention_takes_cudnn_only_when_asked_and_for_shapes_it_runs(monkeypatch):
    """cuDNN's fused attention (compared with the XLA path on a GPU by bench/check_gpu.py) is
    opt-in, and only for 16-bit operands, head dims it supports and even lengths."""
    import jax.numpy as jnp

    from harli_jax.models.llama import use_cudnn_attention

    def chosen(dtype=jnp.bfloat16, head_dim=64, tokens=4):
        q = jnp.zeros((1, tokens, 8, head_dim), dtype)
        return use_cudnn_attention(q, q)

    monkeypatch.delenv("HARLI_ATTENTION", raising=False)
    assert not chosen()
    monkeypatch.setenv("HARLI_ATTENTION", "cudnn")
    assert chosen() and chosen(jnp.float16, 128)
    assert not chosen(jnp.float32) and not chosen(head_dim=160) and not chosen(head_dim=60)
    assert not chosen(tokens=3)
    monkeypatch.setenv("HARLI_ATTENTION", "xla")
    assert not chosen()
    monkeypatch.setenv("HARLI_ATTENTION", "flash")
    with pytest.raises(ValueError, match="HARLI_ATTENTION='flash'"):
        chosen()
