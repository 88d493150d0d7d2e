"""The fused decode projection kernel (through Pallas' interpreter on the CPU), each case against
the same function computed in float64 numpy: RMSNorm prologue, SiLU(gate) * up and residual
epilogues, biases, several weights in one launch, batches of 1 to 4 rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from harli_jax.kernels.matvec import (
    Norm,
    Tuning,
    fused_matvec,
    fused_matvec_reference,
    matvec_fits,
)

EPS = 1e-5
TUNING = Tuning(rows=8, chunk=64)  # several chunks per row at these small widths


def _rms_norm(x, weight):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _inputs(seed: int, batch: int, width: int, outputs: list[int]):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, width))
    weights = [rng.standard_normal((n, width)) / np.sqrt(width) for n in outputs]
    biases = [rng.standard_normal(n) for n in outputs]
    norm_weight = 1.0 + 0.1 * rng.standard_normal(width)
    return x, weights, biases, norm_weight


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_normed_projections_with_biases_match_float64(batch):
    x, weights, biases, norm_weight = _inputs(batch, batch, 192, [64, 16, 16])
    outs = fused_matvec(
        *_f32(x),
        _f32(*weights),
        _f32(*biases),
        norm=Norm(*_f32(norm_weight), EPS),
        tuning=TUNING,
    )
    normed = _rms_norm(x, norm_weight)
    for out, w, b in zip(outs, weights, biases):
        np.testing.assert_allclose(np.asarray(out), normed @ w.T + b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 4])
def test_gated_projection_is_silu_gate_times_up(batch):
    x, (gate, up), _, norm_weight = _inputs(10 + batch, batch, 128, [48, 48])
    (out,) = fused_matvec(
        *_f32(x), _f32(gate, up), norm=Norm(*_f32(norm_weight), EPS), glu=True, tuning=TUNING
    )
    normed = _rms_norm(x, norm_weight)
    expected = _silu(normed @ gate.T) * (normed @ up.T)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_residual_is_added_to_the_projection():
    x, (weight,), _, _ = _inputs(3, 2, 320, [32])  # 320 = 5 chunks of 64
    residual = np.random.default_rng(4).standard_normal((2, 32))
    (out,) = fused_matvec(*_f32(x), _f32(weight), residual=_f32(residual)[0], tuning=TUNING)
    np.testing.assert_allclose(np.asarray(out), residual + x @ weight.T, rtol=1e-4, atol=1e-4)


def test_bfloat16_kernel_rounds_as_the_xla_path():
    x, weights, _, norm_weight = _inputs(5, 1, 256, [32, 32])
    args = (jnp.asarray(x, jnp.bfloat16), [jnp.asarray(w, jnp.bfloat16) for w in weights])
    norm = Norm(jnp.asarray(norm_weight, jnp.bfloat16), EPS)
    (fast,) = fused_matvec(*args, norm=norm, glu=True, tuning=TUNING)
    (xla,) = fused_matvec_reference(*args, norm=norm, glu=True)
    np.testing.assert_allclose(
        np.asarray(fast, np.float32), np.asarray(xla, np.float32), rtol=2e-2, atol=2e-2
    )


def test_shapes_the_kernel_tiles():
    assert matvec_fits(1, 2048, [2048, 256, 256])
    assert matvec_fits(4, 5632, [2048])
    assert not matvec_fits(8, 2048, [2048])  # tensor-core batches are XLA's
    assert not matvec_fits(3, 2048, [2048])  # the engine's batches are powers of two
    assert not matvec_fits(1, 2048, [2044])  # outputs not a whole number of programs


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q, k and v with biases
def test_generation_through_the_fused_projections_equals_the_xla_path(
    checkpoint, monkeypatch, family
):
    from harli_jax import LLM, SamplingParams

    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [list(range(5, 15)), [9, 8, 7]]
    monkeypatch.setenv("HARLI_DECODE_ATTENTION", "pallas")  # the fused layer needs the kernel
    outputs = {}
    for path in ("reference", "pallas"):
        monkeypatch.setenv("HARLI_DECODE_MATVEC", path)  # read when the step is traced
        llm = LLM(checkpoint(family), dtype="float32", page_size=4, max_loras=0)
        outputs[path] = llm.generate(prompts, params)
    for ref, fast in zip(outputs["reference"], outputs["pallas"]):
        assert fast.token_ids == ref.token_ids
        np.testing.assert_allclose(
            [lp.logprob for lp in fast.logprobs], [lp.logprob for lp in ref.logprobs], atol=1e-4
        )
