"""Probe (issue 3): can XLA itself fuse a decoder layer's small elementwise kernels into its
batch-1 projections, if the projections are written as multiply-reduce instead of dots?

At batch 1 a TinyLlama layer runs eight small XLA kernels beside its weight reads (two RMSNorms of
two kernels each, SiLU x up, the residual adds; bench/NOTES.md, session 14): XLA emits an M=1 dot
as a row reduction and fuses no elementwise producer into it. Written as
``sum(x[None, :] * W, axis=-1)`` the projection is a reduction whose input XLA may fuse the norm's
scale into. Each variant runs the layers' projections only (no attention: its output is the
query, so q, k, v and o are all read), for all layers of the shape in one program, with the
weights of every layer distinct (past the L2), against the floor of their bytes at the copy rate
measured in the same run:

- ``dot``: the model's code (`einsum`, RMSNorm as in `harli_jax.models.llama`);
- ``reduce``: every projection as a float32 multiply-reduce over the bf16 weight;
- ``reduce-fused-qkv`` and ``dot-fused-qkv``: each with q, k and v in one weight (one
  projection reads all three);
- ``reduce-folded`` and ``reduce-folded-qkv``: each RMSNorm's gain folded into the weights it
  feeds (W' = W diag(g), made once at load), so a projection reads the residual stream as it
  is and its output rows are scaled by 1/rms after: a per-row scalar commutes with the product,
  and it can fuse into what consumes the output, leaving no kernel for the norm's multiply.

    python3 bench/projection_probe.py --out bench/results   # GPU; prints a table, writes JSON
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import common  # noqa: I001  (sets the allocator before jax is imported)
import jax
import jax.numpy as jnp

EPS = 1e-5
FOLDED = dict(q="norm1", k="norm1", v="norm1", qkv="norm1", gate="norm2", up="norm2")


def inv_rms(h: jax.Array) -> jax.Array:
    h32 = h.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(h32 * h32, -1, keepdims=True) + EPS)


def rms_scale(h: jax.Array, gain: jax.Array) -> jax.Array:
    return (h.astype(jnp.float32) * inv_rms(h)) * gain


def dot(x: jax.Array, weight: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x.astype(weight.dtype), weight)


def reduce(x: jax.Array, weight: jax.Array) -> jax.Array:
    product = x.astype(jnp.float32)[..., None, :] * weight.astype(jnp.float32)
    return jnp.sum(product, -1).astype(weight.dtype)


def layers_program(project, fused_qkv: bool, repeats: int, folded: bool = False):
    """All layers' projections at batch 1: ``h`` [1, hidden] through every layer's weights,
    ``repeats`` times in one program (each pass reads every weight again: they are far past the
    L2), so that one call's time is device time, not the dispatch of its ~200 arguments."""

    def normed(h, w, norm, name):
        """``name``'s projection of ``h`` after the RMSNorm ``norm``, folded or not."""
        if folded:
            return (project(h, w[name + "_folded"]) * inv_rms(h)).astype(h.dtype)
        return project(rms_scale(h, w[norm]), w[name])

    def run(h, layers):
        for w in layers:
            if fused_qkv:
                qkv = normed(h, w, "norm1", "qkv")
                q, kv = qkv[..., : w["o"].shape[1]], qkv[..., w["o"].shape[1] :]
            else:
                q = normed(h, w, "norm1", "q")
                kv = jnp.concatenate([normed(h, w, "norm1", n) for n in ("k", "v")], -1)
            q = q + kv.sum().astype(q.dtype) * 0  # so k and v are computed, not dropped
            h = h + project(q, w["o"])
            gate, up = normed(h, w, "norm2", "gate"), normed(h, w, "norm2", "up")
            h = h + project(jax.nn.silu(gate) * up, w["down"])
        return h

    return jax.jit(lambda h, layers: jax.lax.fori_loop(0, repeats, lambda _, h: run(h, layers), h))


def make_layers(shape: dict, key: jax.Array, num_layers: int) -> tuple[list[dict], int]:
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    dims = dict(q=(hidden, hidden), k=(kv, hidden), v=(kv, hidden), o=(hidden, hidden))
    dims |= dict(gate=(inner, hidden), up=(inner, hidden), down=(hidden, inner))
    layers, nbytes = [], 0
    for index in range(num_layers):
        keys = jax.random.split(jax.random.fold_in(key, index), len(dims))
        layer = {
            name: (jax.random.normal(k, dim, jnp.float32) * 0.02).astype(jnp.bfloat16)
            for k, (name, dim) in zip(keys, dims.items())
        }
        layer["qkv"] = jnp.concatenate([layer["q"], layer["k"], layer["v"]])
        gains = jax.random.split(jax.random.fold_in(key, num_layers + index))
        for norm, gain_key in zip(("norm1", "norm2"), gains):
            layer[norm] = 1 + 0.1 * jax.random.normal(gain_key, (hidden,), jnp.float32)
        for name, norm in FOLDED.items():
            layer[name + "_folded"] = (layer[name] * layer[norm]).astype(jnp.bfloat16)
        nbytes += sum(layer[name].nbytes for name in dims)
        layers.append(layer)
    return layers, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(common.SHAPES))
    parser.add_argument("--layers", type=int, help="layers (default: the shape's; fewer on a CPU)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10, help="passes over the layers a call")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    shape = common.SHAPES[args.shape]
    num_layers = args.layers or shape["num_hidden_layers"]
    layers, nbytes = make_layers(shape, jax.random.key(0), num_layers)
    bandwidth = common.measure_hbm_bandwidth_jax()
    floor_ms = nbytes / bandwidth * 1e3
    h = jnp.ones((1, shape["hidden_size"]), jnp.bfloat16)
    variants = {
        "dot": layers_program(dot, False, args.repeats),
        "reduce": layers_program(reduce, False, args.repeats),
        "reduce-fused-qkv": layers_program(reduce, True, args.repeats),
        "dot-fused-qkv": layers_program(dot, True, args.repeats),
        "reduce-folded": layers_program(reduce, False, args.repeats, folded=True),
        "reduce-folded-qkv": layers_program(reduce, True, args.repeats, folded=True),
    }
    rows, reference = [], variants["dot"](h, layers).astype(jnp.float32)
    for name, program in variants.items():
        out = program(h, layers).astype(jnp.float32)
        error = float(jnp.max(jnp.abs(out - reference)) / jnp.max(jnp.abs(reference)))
        timing = common.time_jax(program, h, layers, warmup=3, iters=args.iters)
        kernels = program.lower(h, layers).compile().as_text().count(", kind=k")
        rows.append(
            dict(
                model=args.shape,
                layers=num_layers,
                variant=name,
                ms=timing["median_ms"] / args.repeats,  # one pass over the layers
                p90_ms=timing["p90_ms"] / args.repeats,
                floor_ms=floor_ms,
                over_floor=timing["median_ms"] / args.repeats / floor_ms,
                fusions=kernels,
                max_rel_diff_vs_dot=error,
            )
        )
    command = shlex.join(["python3", *sys.argv])
    path = args.out / f"projection-probe-{common.device_name()}.json"
    common.write_result(path, rows, command, bandwidth_tb_s=bandwidth / 1e12, weight_bytes=nbytes)


if __name__ == "__main__":
    main()
