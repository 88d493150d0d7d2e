"""Tensor parallelism: a model sharded over 2 or 4 devices computes what it computes on one.

The sharded runs need 8 (CPU) devices, which XLA only creates when ``XLA_FLAGS`` says so before jax
initialises; the pytest process has usually initialised it already, so one child process (this
file run as a script) loads every configuration, measures, and pickles the results. Each test then
asserts one property of those measurements. The tensor_parallel=1 run is the reference (the decoder
itself is checked against transformers in test_model.py).
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harli_jax import LLM, SamplingParams
from harli_jax.engine.sampling import SamplerInputs
from harli_jax.engine.steps import make_forward_step
from harli_jax.memory.kv_cache import PagedBatch
from harli_jax.models.config import ModelConfig
from harli_jax.models.sharding import check_divisible, make_mesh, param_spec

DEVICES = 8
# 8 query heads over 4 KV heads, so KV heads split evenly over up to 4 devices.
HEADS = dict(num_attention_heads=8, num_key_value_heads=4)
LLAMA_TP = (1, 2, 4)
QWEN2_TP = (1, 4)  # qkv biases and a tied LM head; scoring only
SEQUENCES = [[0, 17, 99, 3, 250, 8, 41, 42, 43, 7, 300], [0, 5, 480]]
DECODE_ROWS = 4
COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\("
)


@pytest.fixture(scope="module")
def measured(checkpoint, tmp_path_factory) -> dict:
    """``{(family, tensor_parallel): measurements}``, from a child process with 8 CPU devices."""
    out = tmp_path_factory.mktemp("tensor_parallel") / "measured.pkl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
    args = [sys.executable, __file__, str(out), str(checkpoint("llama", **HEADS))]
    args.append(str(checkpoint("qwen2", **HEADS)))
    child = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    return pickle.loads(out.read_bytes())


def _max_rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("tp", [2, 4])
def test_logits_match_one_device(measured, tp):
    for ours, ref in zip(measured["llama", tp]["logits"], measured["llama", 1]["logits"]):
        assert _max_rel_diff(ours, ref) < 1e-5


def test_qkv_biases_and_tied_lm_head_shard_to_the_same_logits(measured):
    for ours, ref in zip(measured["qwen2", 4]["logits"], measured["qwen2", 1]["logits"]):
        assert _max_rel_diff(ours, ref) < 1e-5


@pytest.mark.parametrize("tp", [2, 4])
def test_greedy_tokens_match_one_device(measured, tp):
    assert measured["llama", tp]["greedy"] == measured["llama", 1]["greedy"]


@pytest.mark.parametrize("tp", [2, 4])
def test_logit_bias_and_penalties_choose_the_same_tokens_as_one_device(measured, tp):
    assert measured["llama", tp]["biased"] == measured["llama", 1]["biased"]
    assert measured["llama", 1]["biased"] != measured["llama", 1]["greedy"]  # the bias bites


@pytest.mark.parametrize("tp", [2, 4])
def test_q_proj_weight_is_split_over_heads(measured, tp):
    q = measured["llama", tp]["q_proj"]
    assert q["spec"] == ("tp", None)
    assert q["devices"] == tp
    out_features, in_features = 8 * 16, 64  # heads x head_dim, hidden
    assert q["shard_shapes"] == [(out_features // tp, in_features)] * tp


@pytest.mark.parametrize("tp", [2, 4])
def test_kv_cache_stays_split_over_kv_heads_after_generation(measured, tp):
    cache = measured["llama", tp]["cache"]
    assert cache["spec"] == (None, None, None, "tp", None)
    assert {shape[3] for shape in cache["shard_shapes"]} == {4 // tp}
    assert len(cache["shard_shapes"]) == tp


def test_decode_step_communicates_activations_not_weights_or_cache(measured):
    # Every collective is smaller than any sharded tensor: no weight or cache page is gathered.
    comms = measured["llama", 4]["decode_collectives"]
    assert comms, "a sharded decode step must reduce something"
    assert max(comms) < measured["llama", 4]["smallest_sharded_tensor"]


def test_more_devices_than_visible_is_refused():
    with pytest.raises(ValueError, match="devices"):
        make_mesh(len(jax.devices()) + 1)


def _config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2)
    fields.update(num_heads=8, num_kv_heads=4, head_dim=16)
    return ModelConfig(**(fields | overrides))


@pytest.mark.parametrize(
    ("field", "value"), [("num_kv_heads", 2), ("num_heads", 6), ("intermediate_size", 130)]
)
def test_dimensions_that_do_not_divide_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        check_divisible(_config(**{field: value}), 4)


@pytest.mark.parametrize(
    ("path", "spec"),
    [
        (("layers", 0, "self_attn", "k_proj", "bias"), ("tp",)),
        (("layers", 0, "self_attn", "o_proj", "weight"), (None, "tp")),
        (("layers", 0, "mlp", "down_proj", "bias"), ()),
        (("layers", 0, "input_layernorm", "weight"), ()),
        (("embed_tokens",), ("tp", None)),
    ],
)
def test_megatron_layout(path, spec):
    assert tuple(param_spec(path, _config(), 4)) == spec


def test_vocabulary_that_does_not_divide_is_replicated():
    assert tuple(param_spec(("lm_head", "weight"), _config(vocab_size=510), 4)) == ()


# -- the child process ----------------------------------------------------------------------------
def _placement(array: jax.Array) -> dict:
    spec = tuple(array.sharding.spec)
    return {
        "spec": spec + (None,) * (array.ndim - len(spec)),  # jit drops trailing Nones
        "devices": len(array.sharding.device_set),
        "shard_shapes": [shard.data.shape for shard in array.addressable_shards],
    }


def _decode_collectives(llm: LLM) -> list[int]:
    """Element counts of the collectives in the compiled decode step (one token per row)."""
    ids = jnp.zeros((DECODE_ROWS, 1), jnp.int32)
    paged = PagedBatch(slots=ids, page_table=jnp.zeros((DECODE_ROWS, 4), jnp.int32))
    sampler = SamplerInputs.build(
        [SamplingParams()] * DECODE_ROWS, [0] * DECODE_ROWS, [0] * DECODE_ROWS, DECODE_ROWS
    )
    last = jnp.zeros(DECODE_ROWS, jnp.int32)
    step = make_forward_step(llm.engine.graphdef)
    slot_ids = None if llm.engine.adapters is None else jnp.zeros(DECODE_ROWS, jnp.int32)
    hlo = step.lower(llm.engine.state, llm.engine.cache, ids, ids, paged, last, sampler, slot_ids)
    sizes = []
    for match in COLLECTIVE.finditer(hlo.compile().as_text()):
        dims = re.findall(r"\[([\d,]*)\]", match.group(1))
        sizes.append(sum(int(np.prod([int(d) for d in shape.split(",") if d])) for shape in dims))
    return sizes


def _smallest_sharded_tensor(llm: LLM) -> int:
    leaves = jax.tree.leaves((llm.engine.state, llm.engine.cache))
    return min(leaf.size for leaf in leaves if not leaf.sharding.is_fully_replicated)


def _measure(out: Path, llama_dir: Path, qwen2_dir: Path) -> None:
    def load(checkpoint_dir: Path, tp: int) -> LLM:
        return LLM(checkpoint_dir, "float32", tensor_parallel=tp, max_num_seqs=2)

    # Short enough to stay within one page per sequence: one prefill and one decode program.
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    biased = SamplingParams(
        max_tokens=5,
        temperature=0.0,
        ignore_eos=True,
        frequency_penalty=1.5,
        logit_bias={7: 3.0, 99: -100.0},
    )
    results = {("qwen2", tp): {"logits": load(qwen2_dir, tp).logits(SEQUENCES)} for tp in QWEN2_TP}
    for tp in LLAMA_TP:
        llm = load(llama_dir, tp)
        results["llama", tp] = {
            "logits": llm.logits(SEQUENCES),
            "greedy": [done.token_ids for done in llm.generate(SEQUENCES, greedy)],
            "biased": [done.token_ids for done in llm.generate(SEQUENCES, biased)],
        }
        if tp > 1:
            results["llama", tp]["q_proj"] = _placement(
                llm.model.layers[0].self_attn.q_proj.weight[...]
            )
            results["llama", tp]["cache"] = _placement(llm.engine.cache.k)
        if tp == LLAMA_TP[-1]:
            results["llama", tp]["smallest_sharded_tensor"] = _smallest_sharded_tensor(llm)
            results["llama", tp]["decode_collectives"] = _decode_collectives(llm)
    out.write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    _measure(*map(Path, sys.argv[1:]))
