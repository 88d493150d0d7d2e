"""One inference step's inputs as a single host array, and their unpacking inside the program.

A step takes twelve small per-row arrays: tokens, positions and KV slots of its chunk, the page
table, the index of the last real token, six sampler settings and the adapter slot. Handed to the
compiled call one by one, each is a host-to-device copy of its own: on the H100's host they made
the call 3.7 ms where the same program on device arrays launched in 1.5 ms (TinyLlama, batch 16).
Here they travel as one int32 array ``[rows, 3 * width + pages + 8]``, each row's fields side by
side; float32 and uint32 settings are bit-cast into it, as :func:`~harli_jax.engine.sampling.pack`
does for the samples coming back. A batch with a logit bias (penalties included) appends each
row's entries, token ids then values (``2 * window`` columns, the window being static in the
program: its sampler variant's ``bias_window``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.engine.sampling import LogitBias, SamplerInputs
from harli_jax.memory.kv_cache import PagedBatch

_PER_ROW = 8  # last, temperature, top_k, top_p, seed, step, min_p, adapter slot


def pack_inputs(
    tokens: np.ndarray,
    positions: np.ndarray,
    slots: np.ndarray,
    table: np.ndarray,
    last: np.ndarray,
    sampler: SamplerInputs,
    adapter_slots: np.ndarray,
    bias: LogitBias | None = None,
) -> np.ndarray:
    """The int32 ``[rows, 3 * width + pages + 8 (+ 2 * window)]`` array of one step (numpy in,
    numpy out)."""
    per_row = (
        last,
        sampler.temperature.view(np.int32),
        sampler.top_k,
        sampler.top_p.view(np.int32),
        sampler.seed.view(np.int32),
        sampler.step,
        sampler.min_p.view(np.int32),
        adapter_slots,
    )
    columns = [tokens, positions, slots, table, np.stack(per_row, axis=1)]
    if bias is not None:
        columns += [bias.token_ids, bias.values.view(np.int32)]
    return np.concatenate(columns, axis=1)


def unpack_inputs(
    inputs: jax.Array, width: int, window: int = 0
) -> tuple[jax.Array, jax.Array, PagedBatch, jax.Array, SamplerInputs, jax.Array, LogitBias | None]:
    """The inverse of :func:`pack_inputs` inside a program: ``(tokens, positions, paged, last,
    sampler, adapter_slots, bias)``; ``width`` (static) is the step's tokens per row, ``window``
    (static) the logit-bias entries a row holds (0: none, and no bias)."""
    as_float = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)  # noqa: E731
    bias = None
    if window:
        entries, inputs = inputs[:, -2 * window :], inputs[:, : -2 * window]
        bias = LogitBias(entries[:, :window], as_float(entries[:, window:]))
    pages = inputs.shape[1] - 3 * width - _PER_ROW
    tokens, positions, slots = (inputs[:, i * width : (i + 1) * width] for i in range(3))
    table = inputs[:, 3 * width : 3 * width + pages]
    last, temperature, top_k, top_p, seed, step, min_p, adapter_slots = (
        inputs[:, 3 * width + pages + i] for i in range(_PER_ROW)
    )
    sampler = SamplerInputs(
        as_float(temperature),
        top_k,
        as_float(top_p),
        jax.lax.bitcast_convert_type(seed, jnp.uint32),
        step,
        as_float(min_p),
    )
    return tokens, positions, PagedBatch(slots, table), last, sampler, adapter_slots, bias
