"""The unified memory arena: one preallocated device buffer of pages, shared by decode and training.

This module owns the buffer (a :class:`KVCache` pytree: ``k`` and ``v`` of shape ``[layers, pages,
page_size, kv_heads, head_dim]``), the host-side :class:`PageTable` that leases its pages, and the
pure functions that put arbitrary arrays into pages and take them out again. A page is index ``p``
across all layers of both ``k`` and ``v``, so it holds ``2 * layers * page_size * kv_heads *
head_dim`` elements of the arena's dtype. Decode sequences keep their K/V there; fine-tune jobs keep
their boundary activations and gradient accumulators there (`store` / `load`).

Every program that touches the arena takes the buffer donated and returns the new one; the host
keeps only the latest (`Arena.buffer`). Page indices are traced int32 arrays, so an owner's pages
can move between calls without recompiling; the number of pages an object takes is static (it
follows from its shape), so steady state never recompiles either.

Pressure: a KV lease that does not fit makes fine-tune leases yield, largest first, when they
could make room: each holder's `Arena.on_yield` callback abandons its open step and releases its
pages at once. Inference is never refused for memory that fine-tuning holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.memory.kv_cache import SCRATCH_PAGE, KVCache
from harli_jax.memory.page_table import OutOfPages, Owner, PageTable


def page_words(buffer: KVCache) -> int:
    """Elements of the arena's dtype in one page (``k`` and ``v`` halves together)."""
    layers, _, page_size, heads, head_dim = buffer.k.shape
    return 2 * layers * page_size * heads * head_dim


def words_for(spec: Any, dtype: jnp.dtype) -> int:
    """Elements of ``dtype`` that an array shaped like ``spec`` takes once bitcast."""
    size = math.prod(spec.shape)
    src, dst = jnp.dtype(spec.dtype).itemsize, jnp.dtype(dtype).itemsize
    return size * src // dst if src >= dst else -(-size // (dst // src))


def pages_for(tree: Any, buffer: KVCache) -> int:
    """Pages that `store` needs for ``tree`` (arrays or ShapeDtypeStructs) in ``buffer``."""
    words = sum(words_for(x, buffer.k.dtype) for x in jax.tree.leaves(tree))
    return -(-words // page_words(buffer))


def _to_words(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` as a flat array of ``dtype`` with the same bits (f32 -> 2 x bf16; same: as is)."""
    x = jnp.asarray(x)
    src, dst = x.dtype.itemsize, jnp.dtype(dtype).itemsize
    if x.dtype == dtype:
        return x.reshape(-1)
    if src >= dst:  # bitcast appends a trailing axis of src // dst words
        return jax.lax.bitcast_convert_type(x, dtype).reshape(-1)
    ratio = dst // src
    flat = jnp.pad(x.reshape(-1), (0, -x.size % ratio))
    return jax.lax.bitcast_convert_type(flat.reshape(-1, ratio), dtype)


def _from_words(words: jax.Array, spec: Any) -> jax.Array:
    """Inverse of `_to_words`: the first ``words_for(spec)`` words as an array shaped ``spec``."""
    dtype, shape = jnp.dtype(spec.dtype), tuple(spec.shape)
    words = words[: words_for(spec, words.dtype)]
    src, dst = dtype.itemsize, words.dtype.itemsize
    if dtype == words.dtype:
        return words.reshape(shape)
    if src > dst:
        return jax.lax.bitcast_convert_type(words.reshape(-1, src // dst), dtype).reshape(shape)
    flat = jax.lax.bitcast_convert_type(words, dtype).reshape(-1)
    return flat[: math.prod(shape)].reshape(shape)


def store(buffer: KVCache, pages: jax.Array, tree: Any) -> KVCache:
    """Writes the arrays of ``tree`` into ``pages`` (int32 [n], traced) of ``buffer``; other pages
    are untouched. Inside a program that donates the buffer, the scatter is in place.

    Words move as the arena's float type (a bitcast of the whole arena to integers would cost a
    copy of it on some backends). XLA's CPU backend scatters bf16 through f32 and so quiets the
    rare NaN-patterned low half of an f32 split in two: a change in the last ~16 bits of that f32.
    """
    words = jnp.concatenate([_to_words(x, buffer.k.dtype) for x in jax.tree.leaves(tree)])
    n, capacity = pages.shape[0], pages.shape[0] * page_words(buffer)
    if words.size > capacity:
        raise ValueError(f"{words.size} words do not fit in {n} pages ({capacity} words)")
    layers, _, *page = buffer.k.shape
    # Any layout of the words over the pages is fine as long as `load` undoes it; this one needs
    # no transpose: half 0 goes to k, half 1 to v.
    data = jnp.pad(words, (0, capacity - words.size)).reshape(2, layers, n, *page)
    return KVCache(*(_scatter(half, pages, update) for half, update in zip(buffer, data)))


def load(buffer: KVCache, pages: jax.Array, like: Any) -> Any:
    """Reads back what `store` wrote to ``pages``: a tree shaped like ``like`` (of
    ShapeDtypeStructs or arrays)."""
    words = jnp.stack([buffer.k[:, pages], buffer.v[:, pages]]).reshape(-1)
    # Materialise the read: XLA must not fuse this gather into an in-place write of the same
    # buffer (e.g. a gradient sum loaded, added to and stored back), or it copies the arena.
    words = jax.lax.optimization_barrier(words)
    specs, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for spec in specs:
        count = words_for(spec, words.dtype)
        out.append(_from_words(words[start : start + count], spec))
        start += count
    return jax.tree.unflatten(treedef, out)


def zero(buffer: KVCache, pages: jax.Array) -> KVCache:
    """Clears ``pages`` (a gradient accumulator's, at the start of a step)."""
    shape = (buffer.k.shape[0], pages.size, *buffer.k.shape[2:])
    flat = pages.reshape(-1)
    return KVCache(*(_scatter(half, flat, jnp.zeros(shape, half.dtype)) for half in buffer))


def _scatter(half: jax.Array, pages: jax.Array, update: jax.Array) -> jax.Array:
    """``half[:, pages] = update``, in place in a program that donates ``half``.

    Pages are leased, so always in bounds: the default "drop out-of-bounds" mode would make XLA
    guard a single-page write as ``select(in_bounds, dynamic_update_slice(...), half)``, which
    is not in place and copies the whole arena (an out-of-memory on the GPU).
    """
    return half.at[:, pages].set(update, unique_indices=True, mode="promise_in_bounds")


class Arena:
    """The host's handle on the one device buffer: the latest buffer and the leases of its pages."""

    def __init__(self, buffer: KVCache, reserved: int = SCRATCH_PAGE + 1) -> None:
        self.buffer = buffer
        self.pages = PageTable(buffer.num_pages, reserved)
        self._yielders: dict[Owner, Callable[[], None]] = {}

    def on_yield(self, owner: Owner, release: Callable[[], None]) -> None:
        """Under pressure, ``release()`` must save what must survive of ``owner``'s pages and free
        its lease before it returns (a fine-tune job abandons its open step)."""
        self._yielders[owner] = release

    @property
    def dtype(self) -> jnp.dtype:
        return self.buffer.k.dtype

    @property
    def page_bytes(self) -> int:
        return page_words(self.buffer) * self.dtype.itemsize

    def pages_for(self, tree: Any) -> int:
        """Pages an object (a tree of arrays or ShapeDtypeStructs) takes in this arena."""
        return pages_for(tree, self.buffer)

    def lease(self, owner: Owner, n: int) -> bool:
        """Leases ``n`` more pages to ``owner``; False, changing nothing, if they cannot be had.

        A KV lease that fine-tune leases stand in the way of makes them yield first.
        """
        short = self.pages.shortfall(n)
        if short and owner.kind == "kv" and short <= self.pages.used_by("finetune"):
            self.relieve(n)
        try:
            self.pages.allocate(owner, n)
        except OutOfPages:
            return False
        return True

    def relieve(self, n: int) -> None:
        """Makes fine-tune leases yield, largest first (the fewest jobs preempted), until ``n``
        pages are free or none is left."""
        size = lambda owner: len(self.pages.pages(owner))  # noqa: E731
        for owner in sorted(self.pages.owners("finetune"), key=lambda owner: -size(owner)):
            if self.pages.num_free >= n:
                break
            self._yielders.get(owner, lambda: None)()
            if owner in self.pages:  # a holder without a callback, or one that kept its pages
                self.pages.free(owner)

    def page_array(self, owner: Owner) -> np.ndarray:
        """``owner``'s pages as the int32 array programs take."""
        return np.asarray(self.pages.pages(owner), np.int32)
