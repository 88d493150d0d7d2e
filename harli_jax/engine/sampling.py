"""Sampling: the per-request :class:`SamplingParams` and the batched, jitted token sampler.

Every row of a batch carries its own temperature, top-k, top-p and PRNG stream, so requests with
different settings share one decode step. A row's key is ``fold_in(PRNGKey(seed), step)``: a
seeded request draws the same tokens whatever else is in its batch.

What a batch needs is decided on the host (:meth:`SamplerVariant.of`) and compiled in statically:
the costly parts of the full sampler (the vocabulary sort of top-k/top-p, the random bits of a
draw, the top-k over the vocabulary for top logprobs) run only in programs whose batch asks for
them. A device-side branch would instead copy its predicate to the host and stall it every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's limit for completions)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation; the field names follow vLLM's ``SamplingParams``."""

    max_tokens: int = 16
    min_tokens: int = 0  # no stop (EOS, stop_token_ids, stop strings) before this many tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # keep tokens at least this share of the likeliest one's probability
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token, 0..5
    # OpenAI's: each token's logit loses presence_penalty once it has been generated and
    # frequency_penalty for every time it has been (the output so far, not the prompt).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); a dict too
    adapter: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = dict(self.logit_bias)
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias.items()))
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "min_tokens": 0 <= self.min_tokens <= self.max_tokens,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= -1,
            "min_p": 0 <= self.min_p <= 1,
            "logprobs": self.logprobs is None or 0 <= self.logprobs <= TOP_LOGPROBS,
            "presence_penalty": -2 <= self.presence_penalty <= 2,
            "frequency_penalty": -2 <= self.frequency_penalty <= 2,
            "logit_bias": all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is out of range")

    def bias(self, generated: Mapping[int, int]) -> dict[int, float]:
        """What this request adds to each token's logit once it has generated each token of
        ``generated`` that many times: its logit bias plus its penalties; empty for most."""
        bias = dict(self.logit_bias)
        if self.presence_penalty or self.frequency_penalty:
            for token, count in generated.items():
                penalty = self.presence_penalty + self.frequency_penalty * count
                bias[token] = bias.get(token, 0.0) - penalty
        return bias


class SamplerInputs(NamedTuple):
    """Per-row sampling settings, as device arrays of shape [batch]."""

    temperature: jax.Array  # float32; 0 means greedy
    top_k: jax.Array  # int32; <= 0 means off
    top_p: jax.Array  # float32
    seed: jax.Array  # uint32
    step: jax.Array  # int32, index of the token being drawn within its request
    min_p: jax.Array  # float32; 0 means off

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
            min_p=np.array([p.min_p for p in params] + [0.0] * pad, np.float32),
        )


class LogitBias(NamedTuple):
    """Per-row additions to the logits, sparse: device arrays."""

    token_ids: jax.Array  # [batch, window] int32; -1: no entry
    values: jax.Array  # [batch, window] float32

    @classmethod
    def build(cls, biases: list[dict[int, float]], batch: int, window: int) -> LogitBias:
        """Pads to ``batch`` rows and ``window`` entries a row (padding rows get none)."""
        token_ids = np.full((batch, window), -1, np.int32)
        values = np.zeros((batch, window), np.float32)
        for row, bias in enumerate(biases):
            token_ids[row, : len(bias)] = list(bias)
            values[row, : len(bias)] = list(bias.values())
        return cls(token_ids, values)


def bias_window(entries: int) -> int:
    """The entries a row of a batch's program holds for its logit bias: 0 when no row has any,
    else the most a row has padded to a power of two (at least 64), so that a penalized request
    recompiles its programs only as the distinct tokens of its output double."""
    return 0 if entries == 0 else max(64, 1 << (entries - 1).bit_length())


class SamplerVariant(NamedTuple):
    """Static flags: which parts of the sampler a batch's program compiles in (hashable, so it is
    a static argument of the jitted step and part of the program key)."""

    restrict: bool = True  # top-k/top-p (a sort over the vocabulary) and min-p
    draw: bool = True  # temperature > 0: random bits over [batch, vocab]; else argmax only
    top_logprobs: bool = True  # the TOP_LOGPROBS best alternatives: a top_k over the vocabulary
    bias_window: int = 0  # logit-bias entries a row holds (:func:`bias_window`); 0: none

    @classmethod
    def of(cls, params: list[SamplingParams], bias_entries: int = 0) -> SamplerVariant:
        """The cheapest variant that gives every request of a batch what it asks for;
        ``bias_entries``: the most logit-bias entries a row has (:meth:`SamplingParams.bias`)."""
        drawing = [p for p in params if p.temperature > 0]
        return cls(
            # Restriction only changes draws: a greedy row takes the argmax of all logits.
            restrict=needs_restriction(drawing),
            draw=bool(drawing),
            top_logprobs=any((p.logprobs or 0) >= 1 for p in params),
            bias_window=bias_window(bias_entries),
        )

    @property
    def suffix(self) -> str:
        """The program key's suffix: the parts compiled in, e.g. "/draw", "/draw-topkp-top",
        "/greedy-bias64"."""
        parts = {"draw": self.draw, "topkp": self.draw and self.restrict, "top": self.top_logprobs}
        names = [name for name, on in parts.items() if on] or ["greedy"]
        if self.bias_window:
            names.append(f"bias{self.bias_window}")
        return "/" + "-".join(names)


FULL = SamplerVariant()
PLAIN = SamplerVariant(restrict=False, draw=True, top_logprobs=False)  # temperature sampling
GREEDY = SamplerVariant(restrict=False, draw=False, top_logprobs=False)


class Sampled(NamedTuple):
    """One step's samples; a field the variant did not compute is None (nothing to read back)."""

    tokens: jax.Array  # [batch] int32
    logprobs: jax.Array  # [batch] float32, log p(token) under the unmodified distribution
    top_ids: jax.Array | None  # [batch, TOP_LOGPROBS]
    top_logprobs: jax.Array | None  # [batch, TOP_LOGPROBS]


def _restrict(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Masks logits outside top-k, then outside the top-p nucleus of what top-k left (HF order),
    then those less likely than ``min_p`` times the likeliest token: p / p_max >= min_p is
    s - s_max >= log(min_p) on the scaled logits, whatever the earlier masks renormalised."""
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
    threshold = jnp.maximum(threshold, ordered[:, :1] + jnp.log(min_p)[:, None])
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def needs_restriction(params: list[SamplingParams]) -> bool:
    """Whether any request of a batch asks for top-k, top-p (the sort that costs time) or
    min-p."""
    return any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params)


def add_bias(logits: jax.Array, bias: LogitBias) -> jax.Array:
    """``logits`` plus each row's sparse bias."""
    batch, vocab = logits.shape
    token_ids = jnp.where(bias.token_ids < 0, vocab, bias.token_ids)  # no entry: dropped
    return logits.at[jnp.arange(batch)[:, None], token_ids].add(bias.values, mode="drop")


def sample(
    logits: jax.Array,
    inputs: SamplerInputs,
    variant: SamplerVariant = FULL,
    bias: LogitBias | None = None,
) -> Sampled:
    """Draws one token per row of ``logits`` [batch, vocab] (float32).

    ``variant`` (static) says which parts to compile in; the engine derives it on the host from
    the batch's requests (:meth:`SamplerVariant.of`). Whatever the variant, a row gets the same
    token and logprob as under the full sampler, provided the variant covers what it asked for.
    ``bias`` (required when ``variant.bias_window``: logit bias and penalties) changes which
    token is chosen, not the logprobs reported: those stay the log-softmax of the model's own
    logits.
    """
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    if variant.bias_window:
        logits = add_bias(logits, bias)
    greedy = jnp.argmax(logits, axis=-1)
    tokens = greedy.astype(jnp.int32)
    if variant.draw:
        scaled = logits / jnp.maximum(inputs.temperature, 1e-6)[:, None]
        restricted = scaled
        if variant.restrict:
            wants = ((inputs.top_k > 0) | (inputs.top_p < 1) | (inputs.min_p > 0))[:, None]
            kept = _restrict(scaled, inputs.top_k, inputs.top_p, inputs.min_p)
            restricted = jnp.where(wants, kept, scaled)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(
            inputs.seed, inputs.step
        )
        drawn = jax.vmap(jax.random.categorical)(keys, restricted)
        tokens = jnp.where(inputs.temperature > 0, drawn, greedy).astype(jnp.int32)
    chosen = jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]
    if not variant.top_logprobs:
        return Sampled(tokens, chosen, None, None)
    top_logprobs, top_ids = jax.lax.top_k(logprobs_all, TOP_LOGPROBS)
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)


def pack(sampled: Sampled) -> jax.Array:
    """``sampled`` as one float32 array [batch, 2 (+ 2 * TOP_LOGPROBS)]: token bits, logprob,
    then top ids (bits) and top logprobs where computed. One array is one device-to-host copy."""
    as_float = lambda ids: jax.lax.bitcast_convert_type(ids, jnp.float32)  # noqa: E731
    columns = [as_float(sampled.tokens)[:, None], sampled.logprobs[:, None]]
    if sampled.top_ids is not None:
        columns += [as_float(sampled.top_ids), sampled.top_logprobs]
    return jnp.concatenate(columns, axis=1)


def unpack(packed: np.ndarray, variant: SamplerVariant) -> Sampled:
    """The inverse of :func:`pack` on the host (numpy views, exact)."""
    top = (None, None)
    if variant.top_logprobs:
        top = (packed[:, 2 : 2 + TOP_LOGPROBS].view(np.int32), packed[:, 2 + TOP_LOGPROBS :])
    return Sampled(packed[:, 0].view(np.int32), packed[:, 1], *top)
