"""The paged KV cache on the device: its layout, and the scatter/gather that every attention layer
does against it.

Layout: ``k`` and ``v`` are ``[layers, pages, page_size, kv_heads, head_dim]``. A sequence owns a
list of pages (leased by :class:`harli_jax.memory.page_table.PageTable`, on the host); a step gets
``slots`` (where each new token's K/V goes, as ``page * page_size + offset``) and ``page_table``
(the pages each row reads, in order). Page 0 is a scratch page: padded tokens write there and
padded rows read it, so no step ever needs a branch on validity.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SCRATCH_PAGE = 0


class PagedBatch(NamedTuple):
    """Where one step's tokens go in the cache and which pages each batch row attends to."""

    slots: jax.Array  # [batch, tokens] int32, flat slot of each new token's K/V
    page_table: jax.Array  # [batch, pages_per_row] int32


class KVCache(NamedTuple):
    k: jax.Array  # [layers, pages, page_size, kv_heads, head_dim]
    v: jax.Array

    @classmethod
    def zeros(
        cls,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype = jnp.bfloat16,
        sharding: jax.sharding.Sharding | None = None,
    ) -> KVCache:
        """An empty cache, created in place on ``sharding``'s devices (default: the default one).

        Raises ``jax.errors.JaxRuntimeError`` if the device cannot hold it."""
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        cache = cls(
            jnp.zeros(shape, dtype, device=sharding), jnp.zeros(shape, dtype, device=sharding)
        )
        # A device allocation that fails is reported only when the buffer is first waited on; the
        # first program that donated it would then allocate it again, mid-serving. Fail here.
        return jax.block_until_ready(cache)

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, slots: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """Scatters ``k``/``v`` [batch, tokens, kv_heads, head_dim] into ``slots`` of ``layer``."""
        page, offset = jnp.divmod(slots.reshape(-1), self.page_size)
        flat_k = k.reshape(-1, *k.shape[2:]).astype(self.k.dtype)
        flat_v = v.reshape(-1, *v.shape[2:]).astype(self.v.dtype)
        return KVCache(
            self.k.at[layer, page, offset].set(flat_k, mode="drop"),
            self.v.at[layer, page, offset].set(flat_v, mode="drop"),
        )

    def read(self, layer: int, page_table: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Gathers each row's pages: two [batch, pages_per_row * page_size, kv_heads, head_dim]."""
        batch, pages = page_table.shape
        keys = self.k[layer, page_table].reshape(batch, pages * self.page_size, *self.k.shape[3:])
        values = self.v[layer, page_table].reshape(batch, pages * self.page_size, *self.v.shape[3:])
        return keys, values
