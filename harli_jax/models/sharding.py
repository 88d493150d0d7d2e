"""Tensor parallelism: where every parameter and the KV cache live on a 1-D ``"tp"`` mesh.

Owns the Megatron-style layout, stated as ``NamedSharding``s only; XLA's SPMD partitioner derives
the per-device programs and inserts the collectives (one all-reduce after ``o_proj`` and one after
``down_proj`` per layer, and the vocabulary reductions of the embedding lookup and the sampler).

- ``q/k/v_proj`` and ``gate/up_proj`` are split on their output dimension (whole attention heads,
  slices of the intermediate), so attention and the SwiGLU product run on local heads/columns;
- ``o_proj`` and ``down_proj`` are split on their input dimension and their partial sums reduced;
- the KV cache is split over KV heads, so each device holds the pages of its own heads only;
- norms and the biases added after a reduction are replicated.

The embedding and the LM head are split on the vocabulary (Megatron's choice): they are the largest
single tensors of small-to-mid models (Llama 3 8B: 1 GiB each in bf16), the lookup of a
vocabulary-sharded table costs one all-reduce of [tokens, hidden], and a vocabulary-sharded LM head
yields vocabulary-sharded logits whose softmax/argmax need only per-row reductions. A vocabulary
that does not divide by the mesh is replicated instead.

A model whose KV heads do not divide by the mesh is refused rather than given replicated KV heads
(as vLLM does when ``tensor_parallel > num_kv_heads``): on a 1-D mesh the replication would have to
be of the whole cache, multiplying its memory by the mesh size.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from harli_jax.models.config import ModelConfig

AXIS = "tp"

# Module names (HF's) by the weight dimension they are split on; weights are [out, in].
_SPLIT_OUTPUT = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
_SPLIT_INPUT = frozenset({"o_proj", "down_proj"})


def check_divisible(config: ModelConfig, tensor_parallel: int) -> None:
    """Raises ValueError unless every split dimension of ``config`` divides by the mesh size."""
    dims = {
        "num_kv_heads": config.num_kv_heads,
        "num_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
    }
    for name, size in dims.items():
        if size % tensor_parallel:
            raise ValueError(
                f"tensor_parallel={tensor_parallel} does not divide {name}={size}: each device "
                "must hold whole heads and an equal slice of the MLP (KV heads are not replicated "
                f"across devices); choose a tensor_parallel that divides {size}"
            )


def make_mesh(tensor_parallel: int, config: ModelConfig | None = None) -> Mesh:
    """A 1-D mesh named ``"tp"`` over the first ``tensor_parallel`` devices.

    With ``config``, also checks that the model splits evenly over it (:func:`check_divisible`),
    so a bad setting fails before any weight is read.
    """
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be at least 1, not {tensor_parallel}")
    devices = jax.devices()
    if tensor_parallel > len(devices):
        raise ValueError(
            f"tensor_parallel={tensor_parallel} needs {tensor_parallel} devices; "
            f"{len(devices)} {devices[0].platform} device(s) are visible"
        )
    if config is not None:
        check_divisible(config, tensor_parallel)
    return Mesh(np.asarray(devices[:tensor_parallel]), (AXIS,))


def param_spec(path: tuple[str | int, ...], config: ModelConfig, tensor_parallel: int) -> P:
    """The partition spec of the parameter at ``path`` (``('layers', 3, 'mlp', 'up_proj',
    'weight')``, as :func:`harli_jax.models.loading.from_pretrained` names it)."""
    module, leaf = path[-2] if len(path) > 1 else path[0], path[-1]
    if module in ("embed_tokens", "lm_head"):
        return P(AXIS, None) if config.vocab_size % tensor_parallel == 0 else P()
    if module in _SPLIT_OUTPUT:
        return P(AXIS, None) if leaf == "weight" else P(AXIS)
    if module in _SPLIT_INPUT and leaf == "weight":
        return P(None, AXIS)
    return P()  # norms, and o/down biases (added once, after the reduction)


def param_sharding(path: tuple[str | int, ...], mesh: Mesh, config: ModelConfig) -> NamedSharding:
    """Where the parameter at ``path`` lives; ``functools.partial(param_sharding, mesh=mesh,
    config=config)`` is ``from_pretrained``'s ``sharding_for``."""
    return NamedSharding(mesh, param_spec(path, config, mesh.shape[AXIS]))


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """The KV cache ``[layers, pages, page_size, kv_heads, head_dim]``, split over KV heads."""
    return NamedSharding(mesh, P(None, None, None, AXIS, None))
