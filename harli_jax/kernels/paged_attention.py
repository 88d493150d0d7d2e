"""Decode attention over the paged KV cache: a Pallas (Triton) kernel and its pure-JAX reference.

One query token per batch row attends to the keys its page table lists, up to and including its
own position (and no further back than the sliding window, if any). The XLA path (the reference)
gathers every row's pages into a contiguous ``[batch, pages * page_size, ...]`` copy per layer and
then runs two batched matmuls with transposes around them, so the KV bytes cross device memory
several times. The kernel reads each page once, straight out of the stacked cache
``[layers, pages, page_size, kv_heads, head_dim]`` (no per-layer slice, which XLA would
materialise), stops at the row's length, and splits long rows over several programs
(flash-decoding) so that small batches still fill the GPU; a tiny XLA fusion merges the splits.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_MASKED = -1e30  # finite, as in the model's own attention: masked logits never make NaN
_QUERY_ROWS = 16  # tensor-core dots need at least 16 rows; the head group is padded up to it


class Tuning(NamedTuple):
    """The kernel's launch shape. Decode attention is bound by how many bytes are in flight, so
    it wants many programs (rows x kv heads x splits), each loading big blocks of keys."""

    block_tokens: int = 128  # keys loaded per loop iteration (a whole number of pages)
    target_programs: int = 512  # about four programs per SM of an H100 (132 SMs)
    min_split_tokens: int = 128  # shorter splits cost more in merging than they gain
    num_warps: int = 4  # 8 for head_dim 128 and up, whose key blocks are twice as large
    num_stages: int = 2


DEFAULT_TUNING = Tuning()


def paged_decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int,
    page_table: jax.Array,
    positions: jax.Array,
    window: int | None = None,
) -> jax.Array:
    """The XLA path: q [B, H, D], caches [L, P, ps, KH, D], page_table [B, n], positions [B].

    Returns [B, H, D] in ``q``'s dtype. Same arithmetic as the model's prefill attention:
    float32 scores and softmax, probabilities cast to the cache dtype before the value product.
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[3]
    keys = k_cache[layer, page_table].reshape(batch, -1, kv_heads, head_dim)
    values = v_cache[layer, page_table].reshape(batch, -1, kv_heads, head_dim)
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bkgd,bskd->bkgs", grouped, keys, preferred_element_type=jnp.float32)
    key_pos = jnp.arange(keys.shape[1])[None, :]
    valid = key_pos <= positions[:, None]
    if window is not None:
        valid &= key_pos > positions[:, None] - window
    scores = jnp.where(valid[:, None, None], scores * head_dim**-0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgs,bskd->bkgd", probs, values)
    return out.reshape(batch, heads, head_dim).astype(q.dtype)


def split_plan(batch: int, kv_heads: int, pages: int, page_size: int, tuning: Tuning) -> int:
    """How many programs share one (row, kv head): enough to fill the GPU, each at least
    ``tuning.min_split_tokens`` keys long; a power of two that divides ``pages``."""
    splits = 1
    while (
        batch * kv_heads * splits < tuning.target_programs
        and pages % (2 * splits) == 0
        and pages // (2 * splits) * page_size >= tuning.min_split_tokens
    ):
        splits *= 2
    return splits


def _kernel(
    layer_ref,  # [1] int32: the layer, as data, so that all layers share one compiled kernel
    positions_ref,  # [B] int32, whole array
    table_ref,  # [pages_per_split] int32: this split's slice of the row's page table
    q_ref,  # [_QUERY_ROWS, D]
    k_ref,  # [L, P, ps, KH, D], whole cache
    v_ref,
    out_ref,  # [_QUERY_ROWS, D] float32, unnormalised
    max_ref,  # [_QUERY_ROWS] float32, running max of the logits
    sum_ref,  # [_QUERY_ROWS] float32, softmax denominator at that max
    *,
    pages_per_block: int,
    window: int | None,
):
    layer = layer_ref[0]
    row, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pages_per_split = table_ref.shape[0]
    page_size, head_dim = k_ref.shape[2], k_ref.shape[4]
    block_tokens = pages_per_block * page_size
    position = positions_ref[row]
    lowest = 0 if window is None else jnp.maximum(position - window + 1, 0)
    first_page = split * pages_per_split
    # Only blocks that hold at least one key in [lowest, position] are visited.
    begin = jnp.maximum(lowest // page_size - first_page, 0) // pages_per_block
    end = jnp.minimum(
        pl.cdiv(position // page_size + 1 - first_page, pages_per_block),
        pages_per_split // pages_per_block,
    )
    q = q_ref[...]
    scale = head_dim**-0.5

    def body(block, carry):
        acc, running_max, denom = carry
        pages = table_ref[pl.ds(block * pages_per_block, pages_per_block)]
        k = k_ref[layer, pages, :, head, :].reshape(block_tokens, head_dim)
        v = v_ref[layer, pages, :, head, :].reshape(block_tokens, head_dim)
        logits = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        key_pos = (first_page + block * pages_per_block) * page_size + jnp.arange(block_tokens)
        valid = (key_pos <= position) & (key_pos >= lowest)
        logits = jnp.where(valid[None, :], logits * scale, _MASKED)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(logits - new_max[:, None])
        denom = denom * correction + probs.sum(axis=-1)
        acc = acc * correction[:, None] + jax.lax.dot_general(
            probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return acc, new_max, denom

    init = (
        jnp.zeros((_QUERY_ROWS, head_dim), jnp.float32),
        jnp.full((_QUERY_ROWS,), _MASKED, jnp.float32),
        jnp.zeros((_QUERY_ROWS,), jnp.float32),
    )
    acc, running_max, denom = jax.lax.fori_loop(begin, end, body, init)
    out_ref[...] = acc
    max_ref[...] = running_max
    sum_ref[...] = denom


@functools.partial(jax.jit, static_argnames=("window", "tuning", "interpret"))
def paged_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int | jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    window: int | None = None,
    *,
    tuning: Tuning | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The kernel; same contract as :func:`paged_decode_attention_reference`.

    Shapes must be powers of two where Triton needs them (page size, head dim); the page table
    is padded to a power of two here (with page 0, never read past a row's position). Off the GPU
    (``interpret=None``) the kernel runs in Pallas' interpreter, which is how CPU tests check it.
    """
    from jax.experimental.pallas import triton as plgpu

    batch, heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[2], k_cache.shape[3]
    group = heads // kv_heads
    if group > _QUERY_ROWS:
        raise ValueError(f"{group} query heads per kv head; the kernel takes at most {_QUERY_ROWS}")
    tuning = tuning or DEFAULT_TUNING
    pages_per_block = max(tuning.block_tokens // page_size, 1)
    pages = max(2 ** math.ceil(math.log2(page_table.shape[1])), pages_per_block)
    page_table = jnp.pad(page_table, ((0, 0), (0, pages - page_table.shape[1])))
    splits = split_plan(batch, kv_heads, pages, page_size, tuning)
    pages_per_split = pages // splits
    pages_per_block = min(pages_per_block, pages_per_split)
    num_warps = tuning.num_warps * (2 if head_dim >= 128 else 1)

    grouped = q.reshape(batch, kv_heads, group, head_dim)
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, _QUERY_ROWS - group), (0, 0)))
    partial_shape = (splits, batch, kv_heads, _QUERY_ROWS)
    out, running_max, denom = pl.pallas_call(
        functools.partial(_kernel, pages_per_block=pages_per_block, window=window),
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.no_block_spec,
            pl.no_block_spec,
            pl.BlockSpec((None, pages_per_split), lambda b, h, s: (b, s)),
            pl.BlockSpec((None, None, _QUERY_ROWS, head_dim), lambda b, h, s: (b, h, 0, 0)),
            pl.no_block_spec,
            pl.no_block_spec,
        ],
        out_specs=[
            pl.BlockSpec(
                (None, None, None, _QUERY_ROWS, head_dim), lambda b, h, s: (s, b, h, 0, 0)
            ),
            pl.BlockSpec((None, None, None, _QUERY_ROWS), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, _QUERY_ROWS), lambda b, h, s: (s, b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=tuning.num_stages),
        interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
        name="paged_decode_attention",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        positions.astype(jnp.int32),
        page_table.astype(jnp.int32),
        grouped,
        k_cache,
        v_cache,
    )

    # Merge the splits (flash-decoding): rescale each to the common max, then normalise.
    overall_max = running_max.max(axis=0)
    weight = jnp.exp(running_max - overall_max)
    total = (denom * weight).sum(axis=0)
    merged = (out * weight[..., None]).sum(axis=0) / total[..., None]
    return merged[:, :, :group].reshape(batch, heads, head_dim).astype(q.dtype)


def use_decode_kernel(heads: int, kv_heads: int, head_dim: int, page_size: int) -> bool:
    """Whether the model should trace the kernel for decode attention of this shape.

    ``HARLI_DECODE_ATTENTION`` (``auto`` | ``pallas`` | ``reference``) chooses; ``auto`` takes the
    kernel on a single GPU only: across a mesh it would need a ``shard_map`` over KV heads (GSPMD
    cannot partition a custom call and would gather the whole cache onto every device). Shapes
    the kernel cannot tile (Triton wants powers of two) always take the reference.
    """
    choice = os.environ.get("HARLI_DECODE_ATTENTION", "auto")
    if choice not in ("auto", "pallas", "reference"):
        raise ValueError(f"HARLI_DECODE_ATTENTION={choice!r}: expected auto, pallas or reference")
    if choice == "auto":
        choice = "pallas" if jax.default_backend() == "gpu" and jax.device_count() == 1 else ""
    return (
        choice == "pallas"
        and heads // kv_heads <= _QUERY_ROWS
        and _power_of_two(head_dim)
        and head_dim >= 16
        and _power_of_two(page_size)
    )


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
