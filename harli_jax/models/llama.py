"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as Flax NNX modules.

Module and parameter names mirror the HF checkpoint (``layers[3].self_attn.q_proj.weight`` is
``model.layers.3.self_attn.q_proj.weight``), and projection weights keep HF's ``[out, in]``
layout, so loading is a rename and LoRA targets are HF module names. The model knows nothing of
LoRA or of paging policy: it attends either to its own tokens (training, full-sequence scoring)
or through a :class:`KVCache` with a :class:`PagedBatch` saying where this step's tokens go.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from harli_jax.kernels.paged_attention import paged_decode_attention, use_decode_kernel
from harli_jax.memory.kv_cache import KVCache, PagedBatch
from harli_jax.models.config import ModelConfig
from harli_jax.models.rope import apply_rope, inverse_frequencies

_MASKED = -1e30  # finite, so a fully masked (padded) row gives a uniform softmax, not NaN


# Backends on which a one-row projection runs as a multiply-reduce (see `Linear`).
MATVEC_BACKENDS = frozenset({"gpu"})


def matvec(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``x @ weight.T`` for ``x`` of one row, as a float32 multiply-reduce over the input axis."""
    product = x.astype(jnp.float32)[..., None, :] * weight.astype(jnp.float32)
    return jnp.sum(product, -1).astype(weight.dtype)


class Linear(nnx.Module):
    """``x @ weight.T + bias`` with the weight in HF's ``[out, in]`` layout.

    One row (a batch-1 decode step) goes through :func:`matvec` on ``MATVEC_BACKENDS``: on the
    H100, XLA's reduce fusion reads the weight faster than its GEMM fusion does for one row, and
    the whole batch-1 decode step ran 5% faster for the TinyLlama and the Llama-3-8B shapes. From
    two rows the GEMM wins (batch 2: the reduce 23% slower; batch 4: 68%).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.weight[...]
        if x.size == x.shape[-1] and jax.default_backend() in MATVEC_BACKENDS:
            y = matvec(x, weight)
        else:
            y = jnp.einsum("...i,oi->...o", x, weight)
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: q [B, T, H, D], keys/values [B, S, KH, D], mask [B, T, S]."""
    batch, tokens, heads, head_dim = q.shape
    kv_heads = keys.shape[2]
    q = q.reshape(batch, tokens, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * head_dim**-0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values)
    return out.reshape(batch, tokens, heads * head_dim)


def use_cudnn_attention(q: jax.Array, keys: jax.Array) -> bool:
    """Whether attention over several tokens a row (prefill chunks, training, scoring) goes
    through cuDNN's fused kernel.

    The XLA path (`attend`) writes the [heads, T, S] scores and probabilities to memory and reads
    them back; cuDNN keeps them on chip. ``HARLI_ATTENTION`` (``xla``, the default, or ``cudnn``)
    chooses: cuDNN's path has not yet run on a GPU here (bench/check_gpu.py part 5 compares it
    with XLA's, bench/attention.py times both), so it is not the default. Only for the shapes
    cuDNN runs: 16-bit operands, a head dim that is a multiple of 8 up to 128, and even lengths
    (its backward pass with a mask needs them).
    """
    choice = os.environ.get("HARLI_ATTENTION", "xla")
    if choice not in ("cudnn", "xla"):
        raise ValueError(f"HARLI_ATTENTION={choice!r}: expected xla or cudnn")
    head_dim = q.shape[-1]
    return (
        choice == "cudnn"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and keys.dtype == q.dtype
        and head_dim % 8 == 0
        and head_dim <= 128
        and q.shape[1] % 2 == 0
        and keys.shape[1] % 2 == 0
    )


def flash_attend(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """`attend` through cuDNN's fused kernel (the mask becomes an additive bias there)."""
    batch, tokens, heads, head_dim = q.shape
    out = jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None], implementation="cudnn")
    return out.reshape(batch, tokens, heads * head_dim)


def causal_mask(query_pos: jax.Array, key_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] mask: key at or before the query, and inside the sliding window if any."""
    q, k = query_pos[:, :, None], key_pos[:, None, :]
    mask = k <= q
    return mask if window is None else mask & (k > q - window)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, heads * head_dim, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(
            hidden, kv_heads * head_dim, bias=config.qkv_bias, dtype=dtype, rngs=rngs
        )
        self.v_proj = Linear(
            hidden, kv_heads * head_dim, bias=config.qkv_bias, dtype=dtype, rngs=rngs
        )
        self.o_proj = Linear(heads * head_dim, hidden, bias=config.o_bias, dtype=dtype, rngs=rngs)
        self.config = config

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        layer: int,
        cache: KVCache | None,
        paged: PagedBatch | None,
        segment_ids: jax.Array | None,
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        batch, tokens, _ = x.shape
        q = self.q_proj(x).reshape(batch, tokens, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, tokens, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(batch, tokens, cfg.num_kv_heads, cfg.head_dim)
        if (
            cache is not None
            and tokens == 1
            and use_decode_kernel(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cache.page_size)
        ):
            # Decode: one kernel rotates, writes the new key and value, and reads each row's
            # pages in place (the new token's slot is where its position falls in its pages).
            out, k_cache, v_cache = paged_decode_attention(
                q[:, 0],
                k[:, 0],
                v[:, 0],
                cache.k,
                cache.v,
                layer,
                paged.page_table,
                positions[:, 0],
                inv_freq,
                cfg.sliding_window,
            )
            return self.o_proj(out.reshape(batch, 1, -1)), KVCache(k_cache, v_cache)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is None:
            # Self-attention over this batch's tokens; packed rows attend within their segment.
            index = jnp.broadcast_to(jnp.arange(tokens), (batch, tokens))
            mask = causal_mask(index, index, cfg.sliding_window)
            if segment_ids is not None:
                mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
            keys, values = k, v
        else:
            cache = cache.write(layer, paged.slots, k, v)
            keys, values = cache.read(layer, paged.page_table)
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (batch, keys.shape[1]))
            mask = causal_mask(positions, key_pos, cfg.sliding_window)
        if use_cudnn_attention(q, keys):
            return self.o_proj(flash_attend(q, keys, values, mask)), cache
        return self.o_proj(attend(q, keys, values, mask)), cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(hidden, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(inner, hidden, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, positions, inv_freq, layer, cache, paged, segment_ids):
        attn_out, cache = self.self_attn(
            self.input_layernorm(x), positions, inv_freq, layer, cache, paged, segment_ids
        )
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """The decoder. ``__call__`` returns final hidden states; ``logits`` applies the LM head, so
    callers choose which positions pay for the vocabulary projection."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Param(
            nnx.initializers.normal(0.02)(
                rngs.params(), (config.vocab_size, config.hidden_size), dtype
            )
        )
        self.layers = nnx.List(
            [DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        paged: PagedBatch | None = None,
        segment_ids: jax.Array | None = None,
        layers: slice = slice(None),
        hidden: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs ``layers`` (all by default) on ``tokens`` [B, T] at ``positions`` [B, T].

        A span that does not start at layer 0 takes its input ``hidden`` from the span before it
        (the LoRA micro-steps cut training this way); the last span applies the final norm.
        """
        inv_freq = jnp.asarray(inverse_frequencies(self.config))
        x = self.embed_tokens[...][tokens] if hidden is None else hidden
        first, last, _ = layers.indices(len(self.layers))
        for index in range(first, last):
            x, cache = self.layers[index](x, positions, inv_freq, index, cache, paged, segment_ids)
        if last == len(self.layers):
            x = self.norm(x)
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., hidden] -> [..., vocab] in float32."""
        if self.lm_head is None:
            out = jnp.einsum("...h,vh->...v", hidden, self.embed_tokens[...])
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)
