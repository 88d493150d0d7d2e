"""The jitted device programs of inference, with their shape buckets.

One program, :func:`make_forward_step`, serves both chunked prefill ([rows, chunk] tokens) and
decode ([rows, 1]): it writes the new tokens' K/V into the donated cache, attends through the page
table, and samples one token per row at that row's last real position. Shapes are rounded up to
buckets so that steady state never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from harli_jax.engine.sampling import Sampled, SamplerInputs, sample
from harli_jax.memory.kv_cache import KVCache, PagedBatch


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two (at least ``smallest``) that ``n`` is padded up to."""
    size = smallest
    while size < n:
        size *= 2
    return size


ForwardStep = Callable[..., tuple[KVCache, Sampled]]


def make_forward_step(graphdef: nnx.GraphDef) -> ForwardStep:
    """``step(state, cache, tokens, positions, paged, last, sampler) -> (cache, Sampled)``.

    ``last`` [rows] is the index of each row's last real token; the cache argument is donated.
    """

    def step(state, cache, tokens, positions, paged: PagedBatch, last, sampler: SamplerInputs):
        model = nnx.merge(graphdef, state)
        hidden, cache = model(tokens, positions, cache, paged)
        rows = jnp.arange(tokens.shape[0])
        return cache, sample(model.logits(hidden[rows, last]), sampler)

    return jax.jit(step, donate_argnums=(1,))


def make_score(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``score(state, tokens, positions) -> logits [rows, tokens, vocab]``, no cache."""

    def score(state, tokens, positions):
        model = nnx.merge(graphdef, state)
        hidden, _ = model(tokens, positions)
        return model.logits(hidden)

    return jax.jit(score)
