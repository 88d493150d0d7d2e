"""Decode attention over the paged KV cache: a Pallas (Triton) kernel and its pure-JAX reference.

One new token per batch row: rotate its query and key (RoPE), write its key and value into the
row's page at its position, and attend to the row's keys up to and including that position (no
further back than the sliding window, if any). The XLA path (the reference) does these as separate
kernels: the rotation, a scatter per cache half, a gather of every row's pages into a contiguous
copy, two batched matmuls with transposes around them. The kernel does them in one launch per
layer: it reads each page once, in place in the stacked cache ``[layers, pages, page_size,
kv_heads, head_dim]`` (a per-layer slice would be materialised by XLA), stops at the row's length,
and splits long rows over several programs (flash-decoding) so that small batches still fill the
GPU; a tiny XLA fusion merges the splits. The new token's key joins the softmax from registers,
so no program waits for the write to land.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from harli_jax.memory.kv_cache import KVCache
from harli_jax.models.rope import apply_rope

_MASKED = -1e30  # finite, as in the model's own attention: masked logits never make NaN
_QUERY_ROWS = 16  # tensor-core dots need at least 16 rows; a head group is padded up to it


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
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int,
    page_table: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    window: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The XLA path. q [B, H, D], k/v [B, KH, D] (before RoPE), caches [L, P, ps, KH, D],
    page_table [B, n], positions [B], inv_freq [D / 2].

    Returns the attention output [B, H, D] in ``q``'s dtype and the caches with each row's new key
    and value written at its position. Same arithmetic as the model's prefill attention: float32
    scores and softmax, probabilities cast to the cache dtype before the value product.
    """
    batch, heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[2], k_cache.shape[3]
    q = apply_rope(q[:, None], positions[:, None], inv_freq)[:, 0]
    k = apply_rope(k[:, None], positions[:, None], inv_freq)
    slots = page_table[jnp.arange(batch), positions // page_size] * page_size
    cache = KVCache(k_cache, v_cache).write(
        layer, (slots + positions % page_size)[:, None], k, v[:, None]
    )
    keys, values = cache.read(layer, page_table)
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bkgd,bskd->bkgs", grouped, keys, preferred_element_type=jnp.float32)
    key_pos = jnp.arange(keys.shape[1])[None, :]
    valid = key_pos <= positions[:, None]
    if window is not None:
        valid &= key_pos > positions[:, None] - window
    scores = jnp.where(valid[:, None, None], scores * head_dim**-0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgs,bskd->bkgd", probs, values)
    return out.reshape(batch, heads, head_dim).astype(q.dtype), cache.k, cache.v


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
    cos_ref,  # [B, D]: RoPE's cosines at each row's position
    sin_ref,  # [B, D]: its sines, negated in the first half (see _rope_tables)
    q_ref,  # [B, H, D], whole array: queries before RoPE
    k_new_ref,  # [B, KH, D], whole array: the new keys before RoPE
    v_new_ref,  # [B, KH, D]
    k_ref,  # [L, P, ps, KH, D], whole cache (read)
    v_ref,
    out_ref,  # [S, B, KH, G, D] float32, unnormalised, whole array
    max_ref,  # [S, B, KH, G] float32, running max of the logits
    sum_ref,  # [S, B, KH, G] float32, softmax denominator at that max
    k_out_ref,  # the caches again, aliased to k_ref / v_ref: the new key and value go here
    v_out_ref,
    *,
    pages_per_block: int,
    query_rows: int,
    window: int | None,
):
    layer = layer_ref[0]
    row, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pages_per_split = table_ref.shape[0]
    page_size, head_dim = k_ref.shape[2], k_ref.shape[4]
    group = out_ref.shape[3]
    block_tokens = pages_per_block * page_size
    split_tokens = pages_per_split * page_size
    position = positions_ref[row]
    lowest = 0 if window is None else jnp.maximum(position - window + 1, 0)
    first_token = split * split_tokens
    owner = (position >= first_token) & (position < first_token + split_tokens)
    scale = head_dim**-0.5

    # RoPE in the rotate-half layout, x * cos + [x2, x1] * [-sin, sin]: the swapped halves are
    # a second load of the same row. Query rows past the group repeat its last query (tensor-core
    # dots want 16 rows), so their results equal that row's and may be stored over it.
    rows = head * group + jnp.minimum(jnp.arange(query_rows), group - 1)
    swap = (jnp.arange(head_dim) + head_dim // 2) % head_dim
    cos, sin = cos_ref[row, :], sin_ref[row, :]
    q = q_ref[row, rows, :] * cos + q_ref[row, rows[:, None], swap[None, :]] * sin
    new_key = k_new_ref[row, head, :] * cos + k_new_ref[row, head, swap] * sin
    new_value = v_new_ref[row, head, :]
    new_logit = (q.astype(jnp.float32) * new_key.astype(jnp.float32)[None, :]).sum(-1) * scale

    @pl.when(owner)
    def _write():  # this split holds the row's position: the new key and value go to its slot
        page = table_ref[(position - first_token) // page_size]
        k_out_ref[layer, page, position % page_size, head, :] = new_key
        v_out_ref[layer, page, position % page_size, head, :] = new_value

    # The cached keys before the position (its slot holds a stale key until the write lands);
    # only blocks that hold at least one key in [lowest, position) are visited.
    begin = jnp.maximum(lowest - first_token, 0) // block_tokens
    end = jnp.minimum(pl.cdiv(position - first_token, block_tokens), split_tokens // block_tokens)

    def body(block, carry):
        acc, running_max, denom = carry
        pages = table_ref[pl.ds(block * pages_per_block, pages_per_block)]
        k = k_ref[layer, pages, :, head, :].reshape(block_tokens, head_dim)
        v = v_ref[layer, pages, :, head, :].reshape(block_tokens, head_dim)
        logits = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        key_pos = first_token + block * block_tokens + jnp.arange(block_tokens)
        valid = (key_pos < position) & (key_pos >= lowest)
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
        jnp.zeros((query_rows, head_dim), jnp.float32),
        jnp.full((query_rows,), _MASKED, jnp.float32),
        jnp.zeros((query_rows,), jnp.float32),
    )
    acc, running_max, denom = jax.lax.fori_loop(begin, end, body, init)
    # The new token itself, in the split that holds it.
    new_max = jnp.where(owner, jnp.maximum(running_max, new_logit), running_max)
    correction = jnp.exp(running_max - new_max)
    new_prob = jnp.where(owner, jnp.exp(new_logit - new_max), 0.0)
    out = acc * correction[:, None] + new_prob[:, None] * new_value.astype(jnp.float32)[None, :]
    group_rows = jnp.minimum(jnp.arange(query_rows), group - 1)
    out_ref[split, row, head, group_rows, :] = out
    max_ref[split, row, head, group_rows] = new_max
    sum_ref[split, row, head, group_rows] = denom * correction + new_prob


def _rope_tables(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """[B, D] cosines and signed sines at ``positions``: the same in every layer's call, so XLA
    computes them once per step. Rounded to ``dtype`` as :func:`apply_rope` rounds them."""
    angles = positions[:, None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1)


@functools.partial(jax.jit, static_argnames=("window", "tuning", "interpret"))
def paged_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int | jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    window: int | None = None,
    *,
    tuning: Tuning | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel; same contract as :func:`paged_decode_attention_reference`. The caches are
    updated in place when the caller donates them (the engine's step does).

    Shapes must be powers of two where Triton needs them (page size, head dim); the page table
    is padded to a power of two here (with page 0, never read past a row's position). Off the GPU
    (``interpret=None``) the kernel runs in Pallas' interpreter, which is how CPU tests check it.
    """
    from jax.experimental.pallas import triton as plgpu

    batch, heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[2], k_cache.shape[3]
    group = heads // kv_heads
    query_rows = max(2 ** math.ceil(math.log2(group)), _QUERY_ROWS)
    tuning = tuning or DEFAULT_TUNING
    pages_per_block = max(tuning.block_tokens // page_size, 1)
    pages = max(2 ** math.ceil(math.log2(page_table.shape[1])), pages_per_block)
    page_table = jnp.pad(page_table, ((0, 0), (0, pages - page_table.shape[1])))
    splits = split_plan(batch, kv_heads, pages, page_size, tuning)
    pages_per_split = pages // splits
    pages_per_block = min(pages_per_block, pages_per_split)
    num_warps = tuning.num_warps * (2 if head_dim >= 128 else 1)

    partial_shape = (splits, batch, kv_heads, group)
    out, running_max, denom, k_cache, v_cache = pl.pallas_call(
        functools.partial(
            _kernel, pages_per_block=pages_per_block, query_rows=query_rows, window=window
        ),
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.no_block_spec,
            pl.no_block_spec,
            pl.BlockSpec((None, pages_per_split), lambda b, h, s: (b, s)),
            *[pl.no_block_spec] * 7,
        ],
        out_specs=[pl.no_block_spec] * 5,
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        ],
        input_output_aliases={8: 3, 9: 4},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=tuning.num_stages),
        interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
        name="paged_decode_attention",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        positions.astype(jnp.int32),
        page_table.astype(jnp.int32),
        *_rope_tables(positions, inv_freq, q.dtype),
        q,
        k.astype(k_cache.dtype),
        v.astype(v_cache.dtype),
        k_cache,
        v_cache,
    )

    # Merge the splits (flash-decoding): rescale each to the common max, then normalise.
    overall_max = running_max.max(axis=0)
    weight = jnp.exp(running_max - overall_max)
    total = (denom * weight).sum(axis=0)
    merged = (out * weight[..., None]).sum(axis=0) / total[..., None]
    return merged.reshape(batch, heads, head_dim).astype(q.dtype), k_cache, v_cache


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
        and heads % kv_heads == 0
        and _power_of_two(head_dim)
        and head_dim >= 16
        and _power_of_two(page_size)
    )


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
