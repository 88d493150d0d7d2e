"""The measurements behind `bench/decode.py`: our decode step, its variants, the engine loop and
prefill, each on one GPU with a KV cache of random contents (never zeros)."""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import decode_profile
from bench.common import SHAPES
from harli_jax.engine.core import EngineConfig, EngineCore
from harli_jax.engine.sampling import FULL, SamplerInputs, SamplerVariant, SamplingParams
from harli_jax.engine.step_inputs import pack_inputs
from harli_jax.engine.steps import make_decode_steps, make_forward_step
from harli_jax.kernels import paged_attention
from harli_jax.kernels.paged_attention import Tuning
from harli_jax.memory.kv_cache import KVCache, PagedBatch
from harli_jax.models import llama
from harli_jax.models.config import ModelConfig
from harli_jax.models.llama import Llama
from harli_jax.models.loading import from_pretrained

PAGE_SIZE = 16
CHAIN = 10  # steps per timed sample of the steady state
# The requests every row serves: plain temperature sampling (the common serving case), so the
# timed program is the engine's PLAIN sampler variant (no top-k/top-p sort, no top logprobs).
PARAMS = SamplingParams()
VARIANT = SamplerVariant.of([PARAMS])
SAMPLES = 15
MULTI_STEPS = 8

_GRAPHS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"  # XLA's default set
# Step variants for experiments: the attention path and its launch shape, the program (the
# engine's step, several steps per dispatch, or greedy decoding with no sampler), XLA options.
VARIANTS: dict[str, dict[str, Any]] = {
    "kernel": dict(attention="pallas"),
    "reference": dict(attention="reference"),
    # The kernel's launch shape (bench/NOTES.md, session 14).
    "attn-blocks-64": dict(attention="pallas", tuning=Tuning(block_tokens=64)),
    "attn-programs-256": dict(attention="pallas", tuning=Tuning(target_programs=256)),
    "attn-programs-1024": dict(
        attention="pallas", tuning=Tuning(target_programs=1024, min_split_tokens=64)
    ),
    "attn-stages-3": dict(attention="pallas", tuning=Tuning(num_stages=3)),
    "attn-warps-8": dict(attention="pallas", tuning=Tuning(num_warps=8)),
    "no-dot-merger": dict(attention="pallas", options={"xla_gpu_dot_merger_threshold_mb": 0}),
    "no-command-buffer": dict(attention="pallas", options={"xla_gpu_enable_command_buffer": ""}),
    "graphs-with-cond": dict(
        attention="pallas",
        options={
            "xla_gpu_enable_command_buffer": _GRAPHS + ",CONDITIONAL,WHILE",
            "xla_gpu_graph_min_graph_size": 1,
        },
    ),
    # Weight reads at small batches: XLA's Triton GEMMs against cuBLAS (bench/NOTES.md, session 11).
    "no-triton-gemm": dict(attention="pallas", options={"xla_gpu_enable_triton_gemm": False}),
    # XLA's Triton emitter for normalisation-shaped fusions (RMSNorm: a row reduction, then the
    # row scaled by it), which its default fusion splits in two kernels (bench/NOTES.md).
    "triton-heroless-fusion": dict(
        attention="pallas",
        options={"xla_gpu_experimental_enable_triton_heroless_priority_fusion": True},
    ),
    "triton-all-fusions": dict(
        attention="pallas", options={"xla_gpu_experimental_all_fusions_with_triton": True}
    ),
    # One-row projections through the GEMM, as before the model's multiply-reduce (bench/NOTES.md,
    # decode sessions 17-19).
    "dot-projections": dict(attention="pallas", projection="dot"),
    "greedy-no-sampler": dict(attention="pallas", program="greedy"),
    # The full sampler (top-k/top-p sort, random bits, top logprobs), as every step ran it before
    # the engine picked sampler variants per batch.
    "full-sampler": dict(attention="pallas", sampler=FULL),
    f"multi{MULTI_STEPS}": dict(attention="pallas", steps=MULTI_STEPS),
}
# How XLA updates a step's command buffer (CUDA graph) when buffer addresses change between
# calls: by default every node that touches a moved buffer is updated before each launch. The
# other modes give buffers fixed virtual addresses so nodes need no update; the names differ
# between XLA versions (NEVER_UPDATE and CAPTURE_CMD_NEVER_UPDATE in jaxlib 0.10, later
# SKIP_TEMP or VMM_PERSISTENT_TEMP, pinning temporaries only), so a name this jaxlib lacks is an
# error row. Each is checked against the program compiled without it (``matches_default``).
VARIANTS |= {
    f"cb-{mode.lower().replace('_', '-')}": dict(
        attention="pallas", options={"xla_gpu_command_buffer_update_mode": mode}
    )
    for mode in ("NEVER_UPDATE", "CAPTURE_CMD_NEVER_UPDATE", "SKIP_TEMP", "VMM_PERSISTENT_TEMP")
}


def load_model(name: str, checkpoint: Path | None) -> tuple[Llama, float]:
    """The model of shape ``name`` in bf16: read by our loader from ``checkpoint``, or (None)
    initialised at random on the device, which is faster and fine for profiling."""
    start = time.perf_counter()
    if checkpoint is not None:
        model = from_pretrained(checkpoint, jnp.bfloat16)
    else:
        from transformers import LlamaConfig

        hf = LlamaConfig(**SHAPES[name]).to_dict() | {"architectures": ["LlamaForCausalLM"]}
        model = Llama(ModelConfig.from_hf(hf), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    return model, time.perf_counter() - start


# keep_unused: the pattern never reads the cache, and jit drops an unread argument, donated or
# not; the output then got a buffer of its own beside the cache (8B B=64 context 4096 ran out of
# memory on the H100 in this program, 32 GiB short).
@functools.partial(jax.jit, donate_argnums=0, keep_unused=True)
def _fill(cache: KVCache) -> KVCache:
    """Overwrites the cache in place with a deterministic, non-constant pattern in [-1, 1]: one
    fused program into the donated buffer."""

    def pattern(x: jax.Array) -> jax.Array:
        phase = sum(
            jax.lax.broadcasted_iota(jnp.float32, x.shape, dim) * rate
            for dim, rate in enumerate((0.37, 0.011, 0.53, 0.29, 0.071))
        )
        return jnp.sin(phase).astype(x.dtype)

    return KVCache(pattern(cache.k), pattern(cache.v))


def _engine(model: Llama, batch: int, context: int) -> EngineCore:
    config = EngineConfig(
        max_num_seqs=batch,
        page_size=PAGE_SIZE,
        num_pages=batch * context // PAGE_SIZE + 1,
        max_model_len=context,
    )
    engine = EngineCore(model, None, config)
    engine.cache = _fill(engine.cache)
    return engine


def _decode_inputs(engine: EngineCore, batch: int, context: int, rng) -> tuple:
    """Decode inputs as the engine builds them (host arrays): one token per row at position
    ``context - 1``."""
    per_row = context // PAGE_SIZE
    pool = rng.permutation(np.arange(1, engine.cache.num_pages))[: batch * per_row]
    table = pool.reshape(batch, per_row).astype(np.int32)
    position = context - 1
    slots = table[:, position // PAGE_SIZE] * PAGE_SIZE + position % PAGE_SIZE
    tokens = rng.integers(0, engine.model_config.vocab_size, (batch, 1)).astype(np.int32)
    positions = np.full((batch, 1), position, np.int32)
    return tokens, positions, slots[:, None].astype(np.int32), table, np.zeros(batch, np.int32)


def _step_args(inputs: tuple) -> tuple[tuple, tuple]:
    """Device arguments of host step ``inputs`` (tokens, positions, slots, table, last) with the
    bench's sampling: for :func:`make_forward_step`'s programs, and the engine's packed array."""
    tokens, positions, slots, table, last = inputs
    batch = tokens.shape[0]
    sampler = SamplerInputs.build([PARAMS] * batch, list(range(batch)), [0] * batch, batch)
    packed = pack_inputs(*inputs, sampler, np.zeros(batch, np.int32))
    separate = (
        jnp.asarray(tokens),
        jnp.asarray(positions),
        PagedBatch(jnp.asarray(slots), jnp.asarray(table)),
        jnp.asarray(last),
        SamplerInputs(*(jnp.asarray(x) for x in sampler)),
        None,  # no adapter slots: the base model
    )
    return separate, (jnp.asarray(packed),)


@contextlib.contextmanager
def projection(kind: str | None) -> Iterator[None]:
    """Traces the model's projections as ``kind``: "dot" sends one-row projections to the GEMM
    as well (the model before :func:`harli_jax.models.llama.matvec`, the baseline of its A/B);
    None: the model's own choice."""
    if kind is None:
        yield
        return
    if kind != "dot":
        raise ValueError(f"unknown projection {kind!r}")
    before, llama.MATVEC_BACKENDS = llama.MATVEC_BACKENDS, frozenset()
    try:
        yield
    finally:
        llama.MATVEC_BACKENDS = before


@contextlib.contextmanager
def environ(name: str, value: str) -> Iterator[None]:
    """Sets environment variable ``name`` to ``value`` for the block (the model reads its
    attention choices when a program is traced), then restores it."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _attention(choice: str, tuning: Tuning | None) -> Iterator[None]:
    """Traces the model with decode attention ``choice`` and kernel ``tuning`` (both are read
    when the step is traced)."""
    before = paged_attention.DEFAULT_TUNING
    paged_attention.DEFAULT_TUNING = tuning or before
    try:
        with environ("HARLI_DECODE_ATTENTION", choice):
            yield
    finally:
        paged_attention.DEFAULT_TUNING = before


def _greedy_step(graphdef: nnx.GraphDef) -> Callable:
    """The engine's step without the sampler (argmax of the logits): isolates the sampler's
    cost."""

    def step(state, cache, tokens, positions, paged, last, sampler, slot_ids):
        model = nnx.merge(graphdef, state)
        hidden, cache = model(tokens, positions, cache, paged)
        logits = model.logits(hidden[jnp.arange(tokens.shape[0]), last])
        return cache, jnp.argmax(logits, axis=-1)

    return jax.jit(step, donate_argnums=(1,))


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _time_chained(step: Callable, cache: KVCache, args: tuple, steps_per_call: int = 1):
    """(cache, {ours_ms, ours_sync_ms, dispatch_ms}) for ``cache, out = step(cache, *args)``."""
    for _ in range(3):
        cache, out = step(cache, *args)
    jax.block_until_ready((cache, out))
    chained = []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        for _ in range(CHAIN):
            cache, out = step(cache, *args)
        jax.block_until_ready((cache, out))
        chained.append((time.perf_counter() - start) / CHAIN / steps_per_call * 1e3)
    sync, dispatch = [], []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        cache, out = step(cache, *args)
        launched = time.perf_counter()
        jax.block_until_ready((cache, out))
        sync.append((time.perf_counter() - start) / steps_per_call * 1e3)
        dispatch.append((launched - start) * 1e3)
    timing = dict(
        ours_ms=_median(chained), ours_sync_ms=_median(sync), dispatch_ms=_median(dispatch)
    )
    return cache, timing


def _kernel_profile(step: Callable, cache: KVCache, args: tuple, steps_per_call: int):
    """(cache, kernel profile) of five chained calls of ``step``."""
    calls = 5

    def run() -> None:
        nonlocal cache
        for _ in range(calls):
            cache, out = step(cache, *args)
        jax.block_until_ready((cache, out))

    report = decode_profile.kernel_profile(run, calls * steps_per_call)
    return cache, report


def _variant(engine: EngineCore, name: str, inputs: tuple, profile: bool):
    """(cache, timing, profile) of one step variant on ``engine``'s cache."""
    spec = VARIANTS[name]
    state, static = engine.state, {}
    with _attention(spec["attention"], spec.get("tuning")), projection(spec.get("projection")):
        if spec.get("program") == "greedy":
            run, args = _greedy_step(engine.graphdef), inputs
        elif "steps" in spec:
            tokens, positions, paged, _, sampler, _ = inputs
            run = make_decode_steps(engine.graphdef, spec["steps"], VARIANT)
            start = positions[:, 0] - spec["steps"] + 1
            args = (tokens[:, 0], start, paged.page_table, sampler)
        else:
            run, args = make_forward_step(engine.graphdef), inputs
            static = {"variant": spec.get("sampler", VARIANT)}
        lowered = run.lower(state, engine.cache, *args, **static)
    started = time.perf_counter()
    compiled = lowered.compile(spec.get("options"))
    compile_s = time.perf_counter() - started
    step = lambda cache, *a: compiled(state, cache, *a)  # noqa: E731
    cache, timing = _time_chained(step, engine.cache, args, spec.get("steps", 1))
    timing["compile_s"] = compile_s
    info: dict[str, Any] = {}
    if "options" in spec:  # the same inputs and cache through the program without the options
        default = lowered.compile()
        cache, expected = default(state, cache, *args)
        cache, got = step(cache, *args)
        same = jax.tree.map(np.array_equal, jax.device_get(expected), jax.device_get(got))
        info["matches_default"] = all(jax.tree.leaves(same))
        info["options"] = spec["options"]
    if profile:
        info["hlo"] = decode_profile.hlo_summary(compiled.as_text())
        cache, info["kernels"] = _kernel_profile(step, cache, args, spec.get("steps", 1))
    return cache, timing, info


def _engine_step(engine: EngineCore, width: int, cache: KVCache, inputs: jax.Array):
    """The engine's own program (``EngineCore._forward``) on its packed inputs."""
    return engine._forward(engine.weights, cache, inputs, width=width, variant=VARIANT)


def time_decode(
    model: Llama, batch: int, context: int, variants: list[str], profile: bool, engine: bool
) -> dict[str, Any]:
    """The row's measurements: the engine's own step, the engine loop, and any variants."""
    rng = np.random.default_rng(batch * 100003 + context)
    out: dict[str, Any] = {}
    try:
        eng = _engine(model, batch, context)  # its arena may not fit beside the weights
        inputs, packed = _step_args(_decode_inputs(eng, batch, context, rng))
        started = time.perf_counter()
        step = functools.partial(_engine_step, eng, 1)
        eng.cache, timing = _time_chained(step, eng.cache, packed)
        out |= timing | {"first_call_s": time.perf_counter() - started, "sampler": VARIANT.suffix}
        if profile:  # the engine's own program: cached by the call above, so no recompile
            started = time.perf_counter()
            lowered = eng._forward.lower(eng.weights, eng.cache, *packed, width=1, variant=VARIANT)
            compiled = lowered.compile()
            out["hlo"] = decode_profile.hlo_summary(compiled.as_text())
            out["lookup_s"] = time.perf_counter() - started
            eng.cache, out["kernels"] = _kernel_profile(step, eng.cache, packed, 1)
        if engine:
            out |= _time_engine(eng, batch, context, rng)
    except Exception as err:  # an out-of-memory row is reported, not fatal (MemoryError too)
        out["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        return out
    for name in variants:
        try:
            eng.cache, timing, info = _variant(eng, name, inputs, profile)
            out[name] = timing | info
        except Exception as err:  # e.g. an XLA option this jaxlib does not know
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return out


def _time_engine(engine: EngineCore, batch: int, context: int, rng, steps: int = 20) -> dict:
    """Median wall time of ``EngineCore.step()`` with ``batch`` sequences decoding at about
    ``context`` tokens. Prompts are marked cached (but for their last token) instead of being
    prefilled: the cache already holds random K/V, which a decode step reads the same way."""
    warmup = 3
    prompt_len = context - warmup - steps - 2
    params = SamplingParams(max_tokens=warmup + steps + 1)
    vocab = engine.model_config.vocab_size
    for _ in range(batch):
        engine.add_request(rng.integers(0, vocab, prompt_len).tolist(), params)
    batcher = engine.batcher
    while batcher.waiting:
        seq = batcher.waiting.popleft()
        seq.num_cached = prompt_len - 1
        batcher.running.append(seq)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    return dict(engine_ms=_median(times[warmup:]), engine_first_s=times[0] / 1e3)


def chunk_inputs(batch: int, prefix: int, chunk: int, vocab: int, rng) -> tuple:
    """Host inputs of a prefill chunk of ``chunk`` tokens a row after ``prefix`` cached ones
    (tokens, positions, slots, table, last): each row owns consecutive pages after the scratch
    page."""
    per_row = (prefix + chunk) // PAGE_SIZE
    table = np.arange(1, 1 + batch * per_row, dtype=np.int32).reshape(batch, per_row)
    positions = np.broadcast_to(np.arange(prefix, prefix + chunk, dtype=np.int32), (batch, chunk))
    slots = np.take_along_axis(table, positions // PAGE_SIZE, axis=1) * PAGE_SIZE
    tokens = rng.integers(0, vocab, (batch, chunk)).astype(np.int32)
    last = np.full(batch, chunk - 1, np.int32)
    return tokens, positions, slots + positions % PAGE_SIZE, table, last


def time_prefill(model: Llama, batch: int, length: int) -> float | None:
    """Tokens/s of the engine's forward step on ``batch`` fresh prompts of ``length`` tokens."""
    rng = np.random.default_rng(length)
    engine = _engine(model, batch, length)
    vocab = engine.model_config.vocab_size
    _, (inputs,) = _step_args(chunk_inputs(batch, 0, length, vocab, rng))
    times = []
    try:
        for _ in range(6):
            start = time.perf_counter()
            engine.cache, out = _engine_step(engine, length, engine.cache, inputs)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
    except Exception as err:  # reported, not fatal: the other rows still count
        print(f"prefill {batch}x{length}: {type(err).__name__}: {str(err)[:200]}")
        return None
    return batch * length / _median(times[2:])


def profile_projections(shape: dict[str, Any], batches: list[int]) -> list[dict[str, Any]]:
    """Weight-read bandwidth (GB/s) of each projection shape of ``shape`` at some batch sizes,
    with the fused QKV and gate-up shapes beside them: the ceiling of the matmul part of a step."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    projections = {
        "q": (hidden, q),
        "k": (hidden, kv),
        "qkv": (hidden, q + 2 * kv),
        "o": (q, hidden),
        "gate": (hidden, inner),
        "gate_up": (hidden, 2 * inner),
        "down": (inner, hidden),
        "lm_head": (hidden, shape["vocab_size"]),
    }
    out = []
    for batch in sorted({batches[0], batches[len(batches) // 2]}):
        for name, (fan_in, fan_out) in projections.items():
            gbs = decode_profile.projection_bandwidth(batch, fan_in, fan_out) / 1e9
            out.append(dict(batch=batch, projection=name, shape=[fan_out, fan_in], gb_s=gbs))
            print(out[-1], flush=True)
    return out
