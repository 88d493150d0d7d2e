"""The peer baselines, measured in the benchmark's own process: HF transformers decode and prefill,
and HF PEFT LoRA training, on a checkpoint directory (see `bench/make_checkpoint.py`).

Decode follows the transformers recipe for fast static-cache decoding: a `StaticCache`, eager
(chunked) prefill, then one-token steps through
`torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`, i.e. CUDA graphs.
Compilation happens per configuration and is reported apart from the step time.

On a GPU models run in bfloat16; on the CPU (smoke tests, "tiny" shape) in float32, eager.
A configuration that runs out of GPU memory returns None and says so; the functions never leave
GPU memory behind except the weights of the last model loaded for inference, which `free_torch()`
drops. Protocol for a benchmark that also runs JAX in the same process: import `bench.common`
first (it stops JAX from preallocating GPU memory), run these baselines, call `free_torch()`, then
run JAX.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from bench.common import time_torch_cuda

_CUDA = torch.cuda.is_available()
_DEVICE = torch.device("cuda" if _CUDA else "cpu")
_DTYPE = torch.bfloat16 if _CUDA else torch.float32
# Free cache slots past the prompt: every timed step rewinds to the same one, so one would do,
# but a little room keeps StaticCache's shapes like those generate() would use.
_DECODE_HEADROOM = 16
# Tokens per prefill forward (all batch rows together): bounds activation memory at batch 128.
_PREFILL_CHUNK_TOKENS = 16384

_inference_model: dict[str, LlamaForCausalLM] = {}  # the last checkpoint loaded, at most one
T = TypeVar("T")


def _synchronize() -> None:
    if _CUDA:
        torch.cuda.synchronize()


def _release() -> None:
    """Drop compiled programs (and their CUDA-graph memory pools), then return freed memory."""
    torch._dynamo.reset()
    gc.collect()
    if _CUDA:
        torch.cuda.empty_cache()


def free_torch() -> None:
    """Release all GPU memory torch holds here, so JAX can use it: cached weights, compiled
    programs, CUDA graphs and the caching allocator's free blocks."""
    _inference_model.clear()
    _release()


def _measure(label: str, run: Callable[[], T]) -> T | None:
    """`run()`, or None if it ran out of GPU memory; releases what it allocated either way."""
    torch._dynamo.reset()  # so a compiled run pays its own compilation, whatever ran before
    try:
        return run()
    except torch.OutOfMemoryError:
        print(f"{label}: out of GPU memory, skipped")
        return None
    finally:
        _release()


def _load(ckpt_dir: str | Path) -> LlamaForCausalLM:
    if not any(Path(ckpt_dir).glob("*.safetensors")):
        # A config alone: random weights built on the device (writing Llama-3-8B's 16 GB
        # checkpoint took 283 s of a 600 s device call; a step's time does not depend on them).
        previous = torch.get_default_dtype()
        torch.set_default_dtype(_DTYPE)
        try:
            with torch.device(_DEVICE):
                return LlamaForCausalLM(LlamaConfig.from_pretrained(str(ckpt_dir)))
        finally:
            torch.set_default_dtype(previous)
    # Loads on the host, then moves: works without accelerate's device_map support.
    return LlamaForCausalLM.from_pretrained(str(ckpt_dir), dtype=_DTYPE).to(_DEVICE)


def load_model(ckpt_dir: str | Path) -> LlamaForCausalLM:
    """The inference model of `ckpt_dir` on the benchmark device, kept loaded between calls."""
    key = str(Path(ckpt_dir).resolve())
    if key not in _inference_model:
        free_torch()
        _inference_model[key] = _load(key).eval()
    return _inference_model[key]


def _random_tokens(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(_DEVICE).manual_seed(seed)
    return torch.randint(vocab_size, (batch, length), device=_DEVICE, generator=generator)


def _rewind(cache: StaticCache, position: int) -> None:
    """Make the next write of every layer land at `position`.

    transformers 5 keeps each static layer's write position in a device tensor,
    `cumulative_length`, at a static address (so CUDA graphs read it); filling it in place rewinds
    the cache without touching the prefilled keys and values.
    """
    for layer in cache.layers:
        layer.cumulative_length.fill_(position)


@torch.no_grad()
def _prefill(model: LlamaForCausalLM, cache: StaticCache, tokens: torch.Tensor) -> torch.Tensor:
    """Eager prefill of `tokens` [batch, T] into `cache`, in chunks; the last position's logits."""
    batch, length = tokens.shape
    chunk = max(1, _PREFILL_CHUNK_TOKENS // batch)
    for start in range(0, length, chunk):
        ids = tokens[:, start : start + chunk]
        positions = torch.arange(start, start + ids.shape[1], device=_DEVICE).unsqueeze(0)
        out = model(
            input_ids=ids,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits


@dataclass(frozen=True)
class StaticDecoder:
    """One decode step at a fixed position over a prefilled `StaticCache`.

    `step()` decodes one token per batch row at position `context` and returns its logits
    [batch, 1, vocab]; `rewind()` must run before each step, so every step sees the same cache.
    Compiled, the logits live in CUDA-graph memory that the next step overwrites: clone to keep.
    """

    step: Callable[[], torch.Tensor]
    rewind: Callable[[], None]


def static_decoder(
    model: LlamaForCausalLM, prompt: torch.Tensor, next_tokens: torch.Tensor, compile: bool
) -> StaticDecoder:
    """Prefill `prompt` [batch, context] and return a decoder of `next_tokens` [batch, 1].

    With `compile`, the step is `torch.compile(model.forward, mode="reduce-overhead",
    fullgraph=True)`: the first calls compile and record CUDA graphs, later calls replay them.
    """
    batch, context = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=context + _DECODE_HEADROOM)
    _prefill(model, cache, prompt)
    position = torch.full((batch, 1), context, device=_DEVICE)
    forward = (
        torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        if compile
        else model.forward
    )

    @torch.no_grad()
    def step() -> torch.Tensor:
        if compile:
            # Tells CUDA-graph trees the previous step's outputs are dead, so replay may reuse them.
            torch.compiler.cudagraph_mark_step_begin()
        out = forward(
            input_ids=next_tokens, position_ids=position, past_key_values=cache, use_cache=True
        )
        return out.logits

    return StaticDecoder(step=step, rewind=lambda: _rewind(cache, context))


def hf_decode_step_ms(
    ckpt_dir: str | Path,
    batch: int,
    context: int,
    compile: bool = True,
    warmup: int = 3,
    iters: int = 20,
) -> float | None:
    """Median ms of one HF decode step (`batch` rows, `context` cached tokens each), or None on OOM.

    Prints the warm-up time (compilation and CUDA-graph capture included) and the step timing.
    """
    label = f"hf decode B={batch} ctx={context} compile={compile}"

    def run() -> float:
        model = load_model(ckpt_dir)
        vocab = model.config.vocab_size
        prompt = _random_tokens(vocab, batch, context)
        decoder = static_decoder(model, prompt, _random_tokens(vocab, batch, 1, seed=1), compile)
        start = time.perf_counter()
        for _ in range(warmup):
            decoder.rewind()
            decoder.step()
        _synchronize()
        warmup_s = time.perf_counter() - start
        timing = time_torch_cuda(decoder.step, warmup=0, iters=iters, setup=decoder.rewind)
        print(
            f"{label}: {timing['median_ms']:.3f} ms/step (p10 {timing['p10_ms']:.3f}, "
            f"p90 {timing['p90_ms']:.3f}); warm-up {warmup_s:.1f} s"
        )
        return timing["median_ms"]

    return _measure(label, run)


def hf_prefill_tok_s(
    ckpt_dir: str | Path, batch: int, seq_len: int, warmup: int = 2, iters: int = 10
) -> float | None:
    """Eager HF prefill throughput in tokens/s: `batch` prompts of `seq_len` tokens into a
    `StaticCache`, logits of the last position only (as generate() does); None on OOM."""
    label = f"hf prefill B={batch} T={seq_len}"

    def run() -> float:
        model = load_model(ckpt_dir)
        prompt = _random_tokens(model.config.vocab_size, batch, seq_len)
        cache = StaticCache(config=model.config, max_cache_len=seq_len)
        timing = time_torch_cuda(
            lambda: _prefill(model, cache, prompt),
            warmup=warmup,
            iters=iters,
            setup=lambda: _rewind(cache, 0),
        )
        tok_s = batch * seq_len / (timing["median_ms"] * 1e-3)
        print(f"{label}: {timing['median_ms']:.2f} ms, {tok_s:.4g} tok/s")
        return tok_s

    return _measure(label, run)


def peft_train_tok_s(
    ckpt_dir: str | Path,
    batch: int,
    seq_len: int,
    r: int = 16,
    alpha: int = 32,
    targets: str | list[str] = "all-linear",
    steps: int = 10,
    warmup: int = 2,
    gradient_checkpointing: bool = False,
) -> float | None:
    """HF PEFT LoRA training throughput in tokens/s; None on OOM.

    LoRA rank `r`, scale `alpha`, no dropout, on `targets` (PEFT names; "all-linear" is every
    linear layer but lm_head); AdamW on the adapter; loss over all tokens. A step is forward,
    backward, optimizer step and zero_grad; tokens/s is batch * seq_len over the median of
    `steps` timed steps after `warmup` untimed ones. First drops the cached inference model
    (`free_torch()`), since PEFT rewrites the model it wraps.
    """
    label = f"peft train B={batch} T={seq_len} r={r} ckpt={gradient_checkpointing}"
    free_torch()

    def run() -> float:
        model = _load(ckpt_dir)
        if gradient_checkpointing:
            # transformers 5.2x renamed the method; both default to non-reentrant checkpointing.
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        lora = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, lora)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        tokens = _random_tokens(model.config.vocab_size, batch, seq_len)

        def step() -> None:
            model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timing = time_torch_cuda(step, warmup=warmup, iters=steps)
        tok_s = batch * seq_len / (timing["median_ms"] * 1e-3)
        print(f"{label}: {timing['median_ms']:.2f} ms/step, {tok_s:.4g} tok/s")
        return tok_s

    return _measure(label, run)
