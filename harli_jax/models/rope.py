"""Rotary position embeddings: the inverse frequencies (with HF's ``linear`` and ``llama3``
scalings) and their application in the rotate-half layout that HF Llama checkpoints use."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies, computed in float64 as HF does in float32."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    params = dict(config.rope_scaling)
    if config.rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif config.rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, params)
    return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, params: dict) -> np.ndarray:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates ``x`` [batch, tokens, heads, head_dim] by ``positions`` [batch, tokens]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
