"""GPU check of the fast decode path against its reference (run on the GPU; CPU tests cover the
kernel through Pallas' interpreter, this covers the compiled Triton kernel).

1. The paged decode attention kernel (RoPE, the new key and value written, attention) against the
   reference on float32-upcast inputs, fresh random data per case: GQA groups of 4, 7 and 8, head
   dims 64 and 128, sliding windows, padded page tables, pages smaller and larger than a block,
   batch 1 to 64, positions from 0 to the row's end. Passing: relative error
   ||out - ref|| / ||ref|| under 1e-2 (bf16 operands), no NaN, within 2x of the XLA bf16 path,
   and the written caches within 1e-2 of the reference's.
   The reports' `rel_err` column holds that error for (1), the largest log-prob gap for (2).
2. The engine's decode step with the kernel against the same step through the XLA path: top-5
   and chosen log-probabilities within 0.05 (greedy tokens agree but for bf16 near-ties), on a
   random 4-layer model.
3. Several decode steps in one program (`make_decode_steps`) against as many single steps.
4. The batch-1 step with one-row projections as a multiply-reduce (`llama.matvec`, the GPU path)
   against the same step with them through the GEMM, as in (2).
5. Attention through cuDNN (`llama.flash_attend`, opt-in: ``HARLI_ATTENTION=cudnn``) against
   the XLA path (`llama.attend`): prefill chunks (fresh, and after a cached prefix) as in (2),
   and the gradient of a packed batch's loss (two examples a row, as training packs them):
   loss within 1e-2, every parameter's gradient within 2e-2 relative error.

    python3 bench/check_gpu.py [--out results.json] [--kernels-only | --prefill-only]
    # exit status 1 if any check fails
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import format_table  # noqa: E402
from bench.decode_bench import environ  # noqa: E402
from harli_jax.engine.sampling import SamplerInputs, SamplingParams  # noqa: E402
from harli_jax.engine.steps import make_decode_steps, make_forward_step  # noqa: E402
from harli_jax.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_reference,
)
from harli_jax.memory.kv_cache import KVCache, PagedBatch  # noqa: E402
from harli_jax.models import llama  # noqa: E402
from harli_jax.models.config import ModelConfig  # noqa: E402
from harli_jax.models.llama import Llama  # noqa: E402

# (name, batch, heads, kv_heads, head_dim, page_size, table width, window)
KERNEL_CASES = [
    ("tinyllama b1", 1, 32, 4, 64, 16, 64, None),
    ("tinyllama b32", 32, 32, 4, 64, 16, 64, None),
    ("llama3-8b b1 long", 1, 32, 8, 128, 16, 256, None),
    ("llama3-8b b64", 64, 32, 8, 128, 16, 16, None),
    ("qwen group 7", 3, 28, 4, 128, 16, 40, None),
    ("window 100", 5, 16, 2, 64, 16, 32, 100),
    ("pages of 8", 4, 8, 8, 64, 8, 24, None),
    ("pages of 128", 8, 32, 4, 64, 128, 8, None),
]
LAYERS, LAYER = 3, 2


def _kernel_case(key, batch, heads, kv_heads, head_dim, page_size, width, window) -> dict:
    keys = jax.random.split(key, 7)
    pages = batch * width + 1
    shape = (LAYERS, pages, page_size, kv_heads, head_dim)
    k_cache = jax.random.normal(keys[0], shape, jnp.bfloat16)
    v_cache = jax.random.normal(keys[1], shape, jnp.bfloat16)
    q = jax.random.normal(keys[2], (batch, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[5], (batch, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[6], (batch, kv_heads, head_dim), jnp.bfloat16)
    table = jax.random.permutation(keys[3], jnp.arange(1, pages, dtype=jnp.int32))
    table = table.reshape(batch, width)
    positions = jax.random.randint(keys[4], (batch,), 0, width * page_size)
    positions = positions.at[0].set(width * page_size - 1)  # one full row, every time
    inv_freq = 1.0 / 10000.0 ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    tail = (LAYER, table, positions, inv_freq, window)
    out, k_out, v_out = paged_decode_attention(q, k, v, k_cache, v_cache, *tail)
    upcast = [x.astype(jnp.float32) for x in (q, k, v, k_cache, v_cache)]
    exact, k_exact, v_exact = paged_decode_attention_reference(*upcast, *tail)
    xla = paged_decode_attention_reference(q, k, v, k_cache, v_cache, *tail)[0]

    err, xla_err = _rel_err(out, exact), _rel_err(xla, exact)
    cache_err = max(_rel_err(k_out, k_exact), _rel_err(v_out, v_exact))
    nan = bool(jnp.isnan(out.astype(jnp.float32)).any())
    ok = err < 1e-2 and not nan and err < 2 * xla_err and cache_err < 1e-2
    return dict(rel_err=err, xla_rel_err=xla_err, cache_rel_err=cache_err, ok=ok)


def _rel_err(x, reference) -> float:
    """||x - reference|| / ||reference||, in float32."""
    x, reference = np.asarray(x, np.float32), np.asarray(reference, np.float32)
    return float(np.linalg.norm(x - reference) / max(np.linalg.norm(reference), 1e-12))


def _random_model(layers: int = 4) -> Llama:
    config = ModelConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=layers,
        num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=4096,
    )  # fmt: skip
    return Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))


def _decode_args(batch: int, width: int, position: int, vocab: int, rng) -> tuple:
    table = rng.permutation(np.arange(1, batch * width + 1)).reshape(batch, width)
    slots = table[:, position // 16] * 16 + position % 16
    sampler = SamplerInputs.build(
        [SamplingParams(temperature=0.0)] * batch, [0] * batch, [0] * batch, batch
    )
    return (
        jnp.asarray(rng.integers(0, vocab, (batch, 1)), jnp.int32),
        jnp.full((batch, 1), position, jnp.int32),
        PagedBatch(jnp.asarray(slots[:, None], jnp.int32), jnp.asarray(table, jnp.int32)),
        jnp.zeros(batch, jnp.int32),
        SamplerInputs(*(jnp.asarray(x) for x in sampler)),
        None,  # no adapter slots
    )


def _fresh_cache(model: Llama, pages: int, seed: int) -> KVCache:
    cfg = model.config
    shape = (cfg.num_layers, pages, 16, cfg.num_kv_heads, cfg.head_dim)
    k, v = jax.random.split(jax.random.key(seed))
    return KVCache(
        jax.random.normal(k, shape, jnp.bfloat16), jax.random.normal(v, shape, jnp.bfloat16)
    )


def _step_with(attention: str, model: Llama, cache: KVCache, args: tuple):
    os.environ["HARLI_DECODE_ATTENTION"] = attention  # read when the step is traced
    graphdef, state = nnx.split(model)
    return make_forward_step(graphdef)(state, cache, *args)


def _engine_step_case(model: Llama, batch: int) -> dict:
    rng = np.random.default_rng(batch)
    width, position = 32, 500
    args = _decode_args(batch, width, position, model.config.vocab_size, rng)
    pages = batch * width + 1
    _, fast = _step_with("pallas", model, _fresh_cache(model, pages, batch), args)
    _, slow = _step_with("reference", model, _fresh_cache(model, pages, batch), args)
    return _same_draws(fast, slow)


def _matvec_case(model: Llama) -> dict:
    """The batch-1 step with its one-row projections as multiply-reduce (the model's GPU path)
    against the same step with them through the GEMM."""
    width, position = 32, 500
    args = _decode_args(1, width, position, model.config.vocab_size, np.random.default_rng(11))
    _, fast = _step_with("pallas", model, _fresh_cache(model, width + 1, 1), args)
    before, llama.MATVEC_BACKENDS = llama.MATVEC_BACKENDS, frozenset()
    try:
        _, slow = _step_with("pallas", model, _fresh_cache(model, width + 1, 1), args)
    finally:
        llama.MATVEC_BACKENDS = before
    return _same_draws(fast, slow)


def _prefill_case(model: Llama, batch: int, prefix: int, chunk: int) -> dict:
    """A chunk of ``chunk`` tokens per row after ``prefix`` cached ones (the cache random), its
    attention through cuDNN against the XLA path."""
    rng = np.random.default_rng(prefix + chunk)
    width = (prefix + chunk) // 16
    table = 1 + np.arange(batch * width).reshape(batch, width)
    positions = np.broadcast_to(np.arange(prefix, prefix + chunk), (batch, chunk))
    slots = np.take_along_axis(table, positions // 16, axis=1) * 16 + positions % 16
    sampler = SamplerInputs.build(
        [SamplingParams(temperature=0.0)] * batch, [0] * batch, [0] * batch, batch
    )
    args = (
        jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, chunk)), jnp.int32),
        jnp.asarray(positions, jnp.int32),
        PagedBatch(jnp.asarray(slots, jnp.int32), jnp.asarray(table, jnp.int32)),
        jnp.full(batch, chunk - 1, jnp.int32),
        SamplerInputs(*(jnp.asarray(x) for x in sampler)),
        None,  # no adapter slots
    )
    drawn = {}
    for path in ("cudnn", "xla"):
        with environ("HARLI_ATTENTION", path):
            graphdef, state = nnx.split(model)
            cache = _fresh_cache(model, batch * width + 1, prefix)
            _, drawn[path] = make_forward_step(graphdef)(state, cache, *args)
    return _same_draws(drawn["cudnn"], drawn["xla"])


def _training_case(model: Llama) -> dict:
    """The gradient of a packed batch's next-token loss with attention through cuDNN against
    the XLA path."""
    rng = np.random.default_rng(5)
    rows, length = 2, 128
    tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (rows, length + 1)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 80 + [2] * 48], rows, axis=0), jnp.int32)
    positions = jnp.where(segments == 1, jnp.arange(length), jnp.arange(length) - 80)
    graphdef, state = nnx.split(model)

    def loss(state):
        m = nnx.merge(graphdef, state)
        hidden, _ = m(tokens[:, :-1], positions, segment_ids=segments)
        logprobs = jax.nn.log_softmax(m.logits(hidden), axis=-1)
        return -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1).mean()

    got = {}
    for path in ("cudnn", "xla"):
        with environ("HARLI_ATTENTION", path):
            got[path] = jax.jit(jax.value_and_grad(loss))(state)
    (fast_loss, fast), (slow_loss, slow) = got["cudnn"], got["xla"]
    worst = max(jax.tree.leaves(jax.tree.map(_rel_err, fast, slow)))
    gap = abs(float(fast_loss) - float(slow_loss))
    return dict(rel_err=worst, xla_rel_err=None, ok=gap < 1e-2 and worst < 2e-2)


def _same_draws(fast, slow) -> dict:
    """Two steps' outputs agree: chosen and top log-probs within 0.05."""
    # bf16 near-ties may flip a greedy choice; then the two choices' log-probs are close too.
    gap = float(jnp.abs(fast.logprobs - slow.logprobs).max())
    top_gap = float(jnp.abs(fast.top_logprobs - slow.top_logprobs).max())
    agree = float((fast.tokens == slow.tokens).mean())
    return dict(
        rel_err=max(gap, top_gap), xla_rel_err=None, agree=agree, ok=max(gap, top_gap) < 5e-2
    )


def _multi_step_case(model: Llama, steps: int = 6) -> dict:
    batch, width, position = 4, 8, 60
    rng = np.random.default_rng(7)
    tokens, positions, paged, last, sampler, _ = _decode_args(
        batch, width, position, model.config.vocab_size, rng
    )
    os.environ["HARLI_DECODE_ATTENTION"] = "pallas"
    graphdef, state = nnx.split(model)
    pages = batch * width + 1
    _, many = make_decode_steps(graphdef, steps)(
        state, _fresh_cache(model, pages, 1), tokens[:, 0], positions[:, 0], paged.page_table,
        sampler,
    )  # fmt: skip
    single = make_forward_step(graphdef)
    cache, drawn = _fresh_cache(model, pages, 1), []
    for i in range(steps):
        pos = positions + i
        slots = paged.page_table[jnp.arange(batch), pos[:, 0] // 16] * 16 + pos[:, 0] % 16
        step_paged = PagedBatch(slots[:, None], paged.page_table)
        step_sampler = sampler._replace(step=sampler.step + i)
        cache, out = single(state, cache, tokens, pos, step_paged, last, step_sampler, None)
        tokens = out.tokens[:, None]
        drawn.append(out.tokens)
    same = bool((jnp.stack(drawn) == many.tokens).all())
    return dict(rel_err=None, xla_rel_err=None, ok=same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--kernels-only", action="store_true", help="only checks of part 1")
    only.add_argument("--prefill-only", action="store_true", help="only checks of part 5")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}")
    results = []
    if not args.prefill_only:
        for i, (name, *case) in enumerate(KERNEL_CASES):
            results.append(dict(check=f"kernel {name}") | _kernel_case(jax.random.key(i), *case))
    if not args.kernels_only:
        model = _random_model()
        for batch, prefix, chunk in ((1, 0, 256), (3, 96, 128), (2, 1000, 24)):
            check = f"prefill b{batch} {chunk} after {prefix}: cudnn vs xla"
            results.append(dict(check=check) | _prefill_case(model, batch, prefix, chunk))
        results.append(dict(check="packed batch gradient: cudnn vs xla") | _training_case(model))
    if not (args.kernels_only or args.prefill_only):
        for batch in (1, 8):
            results.append(dict(check=f"engine step b{batch}") | _engine_step_case(model, batch))
        results.append(dict(check="6 steps in one program") | _multi_step_case(model))
        results.append(dict(check="one-row projections: reduce vs GEMM") | _matvec_case(model))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
