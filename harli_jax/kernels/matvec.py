"""Small-batch projections for decode: a Pallas (Triton) matrix-vector kernel with the layer's
elementwise neighbours fused in, and its pure-JAX reference.

At batch 1 a decoder layer reads its weights through five matrix-vector products, and XLA wraps
them in small kernels of their own: each RMSNorm (a reduce, then a scale), SiLU(gate) * up, the
residual adds. At ~1.3 us a launch these were ~8 of a TinyLlama layer's ~57 us (bench/NOTES.md,
session 14), and XLA will not fuse an elementwise producer into a dot it emits as a reduction. This
kernel does: the RMSNorm is its prologue, SiLU(gate) * up or the residual add its epilogue, and
several weights that read the same input (q, k and v; gate and up) share one launch.

Each program computes ``rows`` outputs of one weight (of both, for gate/up) for every batch row,
looping over the input in ``chunk``-wide slices. Products are accumulated elementwise and reduced
once at the end, so the loop body has no cross-thread reduction in it. Rounding follows the
model's XLA path: the normalised input, each projection and the SiLU product are rounded to the
activation dtype where the model rounds them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MAX_ROWS = 4  # batch rows the kernel serves; larger batches are tensor-core work for XLA


class Norm(NamedTuple):
    """An RMSNorm applied to the kernel's input: ``weight * x / rms(x)``."""

    weight: jax.Array  # [in]
    eps: float


class Tuning(NamedTuple):
    rows: int = 8  # outputs per program: an [8, 512] bf16 slice is 8 KB per load
    chunk: int = 512  # input elements per loop step (per batch row; divided by the batch)
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_TUNING = Tuning()


def fused_matvec_reference(
    x: jax.Array,
    weights: Sequence[jax.Array],
    biases: Sequence[jax.Array] | None = None,
    *,
    norm: Norm | None = None,
    residual: jax.Array | None = None,
    glu: bool = False,
) -> tuple[jax.Array, ...]:
    """The XLA path, as the model computes it. x [M, in], weights [out_i, in] (HF layout).

    Returns ``x' @ W_i.T + b_i`` for each weight, where ``x'`` is ``x`` normalised by ``norm``
    if given; with ``glu`` the one output ``silu(x' @ W_0.T) * (x' @ W_1.T)``; with ``residual``
    (one weight) ``residual + x' @ W_0.T``.
    """
    if norm is not None:
        x32 = x.astype(jnp.float32)
        scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + norm.eps)
        x = norm.weight * (x32 * scale).astype(x.dtype)
    outs = [jnp.einsum("mi,oi->mo", x, w) for w in weights]
    if biases is not None:
        outs = [y + b for y, b in zip(outs, biases)]
    if glu:
        return (jax.nn.silu(outs[0]) * outs[1],)
    if residual is not None:
        return (residual + outs[0],)
    return tuple(outs)


def _kernel(*refs, layout: dict, rows: int, chunk: int, eps: float):
    """One program: ``rows`` outputs of one weight group. ``layout`` (static) says which refs
    are present and where each group's programs start."""
    refs = iter(refs)
    x_ref = next(refs)
    norm_ref = next(refs) if layout["norm"] else None
    w_refs = [next(refs) for _ in range(layout["weights"])]
    b_refs = [next(refs) for _ in range(layout["weights"])] if layout["bias"] else None
    residual_ref = next(refs) if layout["residual"] else None
    out_refs = list(refs)
    batch, width = x_ref.shape
    steps = width // chunk
    program = pl.program_id(0)
    dtype = x_ref.dtype

    if norm_ref is not None:

        def squares(step, total):
            x = x_ref[:, pl.ds(step * chunk, chunk)].astype(jnp.float32)
            return total + (x * x).sum(axis=1)

        total = jax.lax.fori_loop(0, steps, squares, jnp.zeros((batch,), jnp.float32))
        scale = jax.lax.rsqrt(total / width + eps)

    def x_slice(step):
        x = x_ref[:, pl.ds(step * chunk, chunk)]
        if norm_ref is not None:
            x = (x.astype(jnp.float32) * scale[:, None]).astype(dtype)
            x = (x * norm_ref[pl.ds(step * chunk, chunk)]).astype(dtype)
        return x.astype(jnp.float32)[:, None, :]

    def products(indices, first):
        """[batch, rows] float32 products of the weights ``indices`` at rows ``first``..."""

        def body(step, accs):
            x = x_slice(step)
            return tuple(
                acc
                + w_refs[i][pl.ds(first, rows), pl.ds(step * chunk, chunk)].astype(jnp.float32)[
                    None
                ]
                * x
                for acc, i in zip(accs, indices)
            )

        init = tuple(jnp.zeros((batch, rows, chunk), jnp.float32) for _ in indices)
        accs = jax.lax.fori_loop(0, steps, body, init)
        outs = []
        for acc, i in zip(accs, indices):
            y = acc.sum(axis=2)
            if b_refs is not None:
                y = y + b_refs[i][pl.ds(first, rows)].astype(jnp.float32)[None, :]
            outs.append(y.astype(dtype).astype(jnp.float32))
        return outs

    for group, (indices, start, stop) in enumerate(layout["groups"]):

        @pl.when((program >= start) & (program < stop))
        def _(group=group, indices=indices, start=start):
            first = (program - start) * rows
            ys = products(indices, first)
            if layout["glu"]:
                gate, up = ys
                y = (gate / (1.0 + jnp.exp(-gate))).astype(dtype).astype(jnp.float32) * up
            else:
                (y,) = ys
            if residual_ref is not None:
                y = residual_ref[:, pl.ds(first, rows)].astype(jnp.float32) + y
            out_refs[group][:, pl.ds(first, rows)] = y.astype(dtype)


@functools.partial(jax.jit, static_argnames=("glu", "eps", "tuning", "interpret"))
def _fused_matvec(x, weights, biases, norm_weight, residual, *, glu, eps, tuning, interpret):
    from jax.experimental.pallas import triton as plgpu

    batch, width = x.shape
    rows = tuning.rows
    chunk = _chunk(width, tuning.chunk // batch)
    outputs = [weights[0].shape[0]] if glu else [w.shape[0] for w in weights]
    groups, start = [], 0
    for group, out_features in enumerate(outputs):
        indices = (0, 1) if glu else (group,)
        groups.append((indices, start, start + out_features // rows))
        start += out_features // rows
    layout = dict(
        norm=norm_weight is not None,
        weights=len(weights),
        bias=biases is not None,
        residual=residual is not None,
        glu=glu,
        groups=tuple(groups),
    )
    operands = [x]
    operands += [norm_weight] if norm_weight is not None else []
    operands += list(weights) + (list(biases) if biases is not None else [])
    operands += [residual] if residual is not None else []
    return tuple(
        pl.pallas_call(
            functools.partial(_kernel, layout=layout, rows=rows, chunk=chunk, eps=eps),
            grid=(start,),
            in_specs=[pl.no_block_spec] * len(operands),
            out_specs=[pl.no_block_spec] * len(outputs),
            out_shape=[jax.ShapeDtypeStruct((batch, n), x.dtype) for n in outputs],
            compiler_params=plgpu.CompilerParams(
                num_warps=tuning.num_warps, num_stages=tuning.num_stages
            ),
            interpret=interpret,
            name="fused_matvec",
        )(*operands)
    )


def fused_matvec(
    x: jax.Array,
    weights: Sequence[jax.Array],
    biases: Sequence[jax.Array] | None = None,
    *,
    norm: Norm | None = None,
    residual: jax.Array | None = None,
    glu: bool = False,
    tuning: Tuning | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, ...]:
    """The kernel; same contract as :func:`fused_matvec_reference`, for shapes where
    :func:`matvec_fits` holds. Off the GPU (``interpret=None``) it runs in Pallas' interpreter."""
    if glu and len(weights) != 2 or residual is not None and len(weights) != 1:
        raise ValueError("glu takes two weights (gate, up); a residual takes one weight")
    return _fused_matvec(
        x,
        tuple(weights),
        None if biases is None else tuple(biases),
        None if norm is None else norm.weight,
        residual,
        glu=glu,
        eps=0.0 if norm is None else float(norm.eps),
        tuning=tuning or DEFAULT_TUNING,
        interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
    )


def _chunk(width: int, target: int) -> int:
    """The largest power of two up to ``target`` that divides ``width``."""
    chunk = 1
    while chunk * 2 <= target and width % (chunk * 2) == 0:
        chunk *= 2
    return chunk


def matvec_fits(
    batch: int, width: int, outputs: Sequence[int], tuning: Tuning | None = None
) -> bool:
    """Whether the kernel tiles this shape: a batch of at most :data:`MAX_ROWS` (a power of two,
    as the engine's buckets are), outputs a multiple of ``rows``, the input a multiple of 16."""
    tuning = tuning or DEFAULT_TUNING
    return (
        batch <= MAX_ROWS
        and batch & (batch - 1) == 0
        and width % 16 == 0
        and all(n % tuning.rows == 0 for n in outputs)
    )


def use_fused_matvec() -> bool:
    """Whether the model should trace the kernel for its decode projections.

    ``HARLI_DECODE_MATVEC`` (``auto`` | ``pallas`` | ``reference``) chooses; ``auto`` takes the
    kernel on a single GPU only (as the attention kernel: a mesh would need a ``shard_map``).
    """
    choice = os.environ.get("HARLI_DECODE_MATVEC", "auto")
    if choice not in ("auto", "pallas", "reference"):
        raise ValueError(f"HARLI_DECODE_MATVEC={choice!r}: expected auto, pallas or reference")
    if choice == "auto":
        return jax.default_backend() == "gpu" and jax.device_count() == 1
    return choice == "pallas"
