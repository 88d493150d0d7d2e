"""A step's inputs travel to the device as one packed array and come back out unchanged."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from harli_jax.engine.sampling import LogitBias, SamplerInputs, SamplingParams
from harli_jax.engine.step_inputs import pack_inputs, unpack_inputs


@pytest.mark.parametrize("window", [0, 64])
def test_packed_step_inputs_unpack_to_the_same_arrays_inside_a_program(window: int) -> None:
    rng = np.random.default_rng(0)
    rows, width, pages = 4, 3, 5
    ints = lambda *shape: rng.integers(-(2**31), 2**31 - 1, shape).astype(np.int32)  # noqa: E731
    tokens, positions, slots, table, last = (
        ints(rows, width),
        ints(rows, width),
        ints(rows, width),
        ints(rows, pages),
        ints(rows),
    )
    params = [
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40),
        SamplingParams(top_p=1e-3),
    ]
    sampler = SamplerInputs.build(params, [2**32 - 1, 7], [0, 12], rows)
    adapter_slots = np.array([0, 3, 1, 0], np.int32)
    biases = [{5: -1.5, 9: 0.25}, {t: t / 8 for t in range(64)}]
    bias = LogitBias.build(biases, rows, window) if window else None
    packed = pack_inputs(tokens, positions, slots, table, last, sampler, adapter_slots, bias)

    out = jax.jit(unpack_inputs, static_argnums=(1, 2))(packed, width, window)

    expected = (tokens, positions, slots, table, last, *sampler, adapter_slots)
    got = (out[0], out[1], *out[2], out[3], *out[4], out[5])
    if window:
        expected, got = expected + tuple(bias), got + tuple(out[6])
    else:
        assert out[6] is None
    for want, have in zip(expected, got, strict=True):
        assert np.asarray(have).dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(have), want)
