"""Sampling: the per-request :class:`SamplingParams` and the batched, jitted token sampler.

Every row of a batch carries its own temperature, top-k, top-p and PRNG stream, so requests with
different settings share one decode step. A row's key is ``fold_in(PRNGKey(seed), step)``: a
seeded request draws the same tokens whatever else is in its batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's limit for completions)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation; the field names follow vLLM's ``SamplingParams``."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token, 0..5
    adapter: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= -1,
            "logprobs": self.logprobs is None or 0 <= self.logprobs <= TOP_LOGPROBS,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is out of range")


class SamplerInputs(NamedTuple):
    """Per-row sampling settings, as device arrays of shape [batch]."""

    temperature: jax.Array  # float32; 0 means greedy
    top_k: jax.Array  # int32; <= 0 means off
    top_p: jax.Array  # float32
    seed: jax.Array  # uint32
    step: jax.Array  # int32, index of the token being drawn within its request

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], steps: list[int], batch: int):
        """Pads to ``batch`` rows (padding rows are greedy and ignored)."""
        pad = batch - len(params)
        return cls(
            temperature=np.array([p.temperature for p in params] + [0.0] * pad, np.float32),
            top_k=np.array([p.top_k for p in params] + [0] * pad, np.int32),
            top_p=np.array([p.top_p for p in params] + [1.0] * pad, np.float32),
            seed=np.array(seeds + [0] * pad, np.uint32),
            step=np.array(steps + [0] * pad, np.int32),
        )


class Sampled(NamedTuple):
    tokens: jax.Array  # [batch] int32
    logprobs: jax.Array  # [batch] float32, log p(token) under the unmodified distribution
    top_ids: jax.Array  # [batch, TOP_LOGPROBS]
    top_logprobs: jax.Array  # [batch, TOP_LOGPROBS]


def _restrict(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks logits outside top-k, then outside the top-p nucleus of what top-k left (HF order)."""
    vocab = scaled.shape[-1]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ordered = jnp.where(rank[None, :] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) & (rank[None, :] < k[:, None])
    kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def needs_restriction(params: list[SamplingParams]) -> bool:
    """Whether any request of a batch asks for top-k or top-p (the sort that costs time)."""
    return any(p.top_k > 0 or p.top_p < 1 for p in params)


def sample(logits: jax.Array, inputs: SamplerInputs, restrict: bool = True) -> Sampled:
    """Draws one token per row of ``logits`` [batch, vocab] (float32).

    ``restrict`` (static) compiles in the top-k/top-p sort; the engine decides it on the host
    from the batch's requests, because a device-side branch would stall the host every step.
    """
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(inputs.temperature, 1e-6)[:, None]
    restricted = scaled
    if restrict:
        wants = ((inputs.top_k > 0) | (inputs.top_p < 1))[:, None]
        restricted = jnp.where(wants, _restrict(scaled, inputs.top_k, inputs.top_p), scaled)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(
        inputs.seed, inputs.step
    )
    drawn = jax.vmap(jax.random.categorical)(keys, restricted)
    tokens = jnp.where(inputs.temperature > 0, drawn, greedy).astype(jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(logprobs_all, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)
