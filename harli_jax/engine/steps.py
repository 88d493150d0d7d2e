"""The jitted device programs of inference, with their shape buckets.

One step, :func:`forward_step`, serves both chunked prefill ([rows, chunk] tokens) and decode
([rows, 1]): it writes the new tokens' K/V into the donated cache, attends through the page table,
and samples one token per row at that row's last real position. The engine runs it as
:func:`make_engine_step`, its inputs and samples each packed into one array; shapes are rounded up
to buckets so that steady state never recompiles. :func:`make_decode_steps` runs several decode
steps in one program (each feeds its sampled token to the next), so one host dispatch covers them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from harli_jax.engine.sampling import (
    FULL,
    LogitBias,
    Sampled,
    SamplerInputs,
    SamplerVariant,
    pack,
    sample,
)
from harli_jax.engine.step_inputs import unpack_inputs
from harli_jax.lora.inject import set_slots
from harli_jax.memory.kv_cache import KVCache, PagedBatch


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two (at least ``smallest``) that ``n`` is padded up to."""
    size = smallest
    while size < n:
        size *= 2
    return size


ForwardStep = Callable[..., tuple[KVCache, Sampled]]


def state_arrays(state: nnx.State) -> tuple[jax.Array, ...]:
    """``state``'s arrays as a flat tuple: what the engine's program takes for its weights.

    A call flattens its arguments on every dispatch, and an ``nnx.State``'s Variables flatten
    through Python (~0.8 us each on a CPU core: 150 us for TinyLlama's 201) where a tuple of
    arrays flattens in C++; decode pays it on every token's critical path."""
    return tuple(jax.tree.leaves(state))


def forward_step(graphdef: nnx.GraphDef) -> ForwardStep:
    """``step(state, cache, tokens, positions, paged, last, sampler, slot_ids, variant=FULL,
    bias=None) -> (cache, Sampled)``, not jitted.

    ``last`` [rows] is the index of each row's last real token; ``slot_ids`` [rows] each row's
    adapter slot (None for a model without a LoRA bank); ``variant`` (a :class:`SamplerVariant`)
    picks the sampler's parts; ``bias`` is the logit bias of a variant with a ``bias_window``.
    """

    def step(
        state,
        cache,
        tokens,
        positions,
        paged,
        last,
        sampler,
        slot_ids,
        variant: SamplerVariant = FULL,
        bias: LogitBias | None = None,
    ):
        model = nnx.merge(graphdef, state)
        if slot_ids is not None:
            set_slots(model, slot_ids)
        hidden, cache = model(tokens, positions, cache, paged)
        rows = jnp.arange(tokens.shape[0])
        return cache, sample(model.logits(hidden[rows, last]), sampler, variant, bias)

    return step


def make_forward_step(graphdef: nnx.GraphDef) -> ForwardStep:
    """:func:`forward_step` jitted: ``variant`` is static and the cache argument is donated."""
    return jax.jit(forward_step(graphdef), donate_argnums=(1,), static_argnames=("variant",))


def make_engine_step(
    graphdef: nnx.GraphDef, state_def: jax.tree_util.PyTreeDef, lora: bool
) -> Callable[..., tuple]:
    """``step(weights, cache, inputs, width=..., variant=FULL) -> (cache, packed samples)``: the
    engine's program, :func:`forward_step` over one host array of inputs
    (:func:`~harli_jax.engine.step_inputs.pack_inputs`) with its samples packed into one array
    (:func:`~harli_jax.engine.sampling.pack`): one copy each way per step. ``weights`` is the
    model state's arrays in the order of ``state_def`` (:func:`state_arrays`). ``width`` (the
    tokens per row) and ``variant`` are static; ``lora``: the model carries an adapter bank, so
    each row's adapter slot is set. The cache argument is donated."""
    body = forward_step(graphdef)

    def step(weights, cache, inputs, width: int, variant: SamplerVariant = FULL):
        state = jax.tree.unflatten(state_def, weights)
        *arrays, slot_ids, bias = unpack_inputs(inputs, width, variant.bias_window)
        cache, sampled = body(state, cache, *arrays, slot_ids if lora else None, variant, bias=bias)
        return cache, pack(sampled)

    return jax.jit(step, donate_argnums=(1,), static_argnames=("width", "variant"))


def make_decode_steps(
    graphdef: nnx.GraphDef, num_steps: int, variant: SamplerVariant = FULL
) -> Callable[..., tuple]:
    """``run(state, cache, tokens, positions, page_table, sampler) -> (cache, Sampled)``.

    Decodes ``num_steps`` tokens per row from ``tokens`` [rows] at ``positions`` [rows]; each
    step's token comes from the one before. ``page_table`` [rows, pages] must already hold every
    position reached; ``sampler.step`` is the first step's index and advances by one per step.
    The outputs stack along a new leading axis of ``num_steps``; the cache is donated. A row that
    finishes early (a stop token) decodes on to the end: the host drops what follows. ``variant``
    picks the sampler's parts, as in :func:`make_forward_step`.
    """

    def run(state, cache, tokens, positions, page_table, sampler: SamplerInputs):
        model = nnx.merge(graphdef, state)
        page_size = cache.page_size
        rows = jnp.arange(tokens.shape[0])

        def one_step(carry, _):
            cache, tokens, positions, step = carry
            slots = page_table[rows, positions // page_size] * page_size + positions % page_size
            paged = PagedBatch(slots[:, None], page_table)
            hidden, cache = model(tokens[:, None], positions[:, None], cache, paged)
            sampled = sample(model.logits(hidden[:, 0]), sampler._replace(step=step), variant)
            return (cache, sampled.tokens, positions + 1, step + 1), sampled

        carry = (cache, tokens, positions, sampler.step)
        (cache, *_), sampled = jax.lax.scan(one_step, carry, length=num_steps)
        return cache, sampled

    return jax.jit(run, donate_argnums=(1,))


def make_score(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``score(state, tokens, positions, slot_ids) -> logits [rows, tokens, vocab]``, no cache;
    ``slot_ids`` as in :func:`make_forward_step`."""

    def score(state, tokens, positions, slot_ids):
        model = nnx.merge(graphdef, state)
        if slot_ids is not None:
            set_slots(model, slot_ids)
        hidden, _ = model(tokens, positions)
        return model.logits(hidden)

    return jax.jit(score)
