"""What every ``harli-jax`` sub-command shares: the user-error type, the model flags, the
persistent compilation cache every command that loads a model compiles into, and compiling the
inference programs at start-up with a progress bar."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class UsageError(Exception):
    """A user mistake the CLI reports in one line (exit status 2), naming the flag or file."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="HF checkpoint directory (default: the embedded demo model)"
    )
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32")
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="share of the device's memory for weights, programs and the KV/fine-tune arena, "
        "in (0, 1], as vLLM's --gpu-memory-utilization (default 0.9; where the device does not "
        "report its memory, e.g. a CPU, the arena holds every sequence's full context twice)",
    )
    parser.add_argument(
        "--compile-cache",
        default=default_compile_cache(),
        help="directory of JAX's persistent compilation cache, so that a later run loads its "
        "programs instead of compiling them (the main job's start-up: 26 against 89 s on a "
        "2-core CPU); 'off' to compile every time (default: $JAX_COMPILATION_CACHE_DIR, else "
        "$XDG_CACHE_HOME/harli-jax/jax)",
    )


def default_compile_cache() -> str:
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(cache_home) / "harli-jax" / "jax")


def enable_compile_cache(directory: str | os.PathLike[str]) -> None:
    """JAX's persistent compilation cache in ``directory``, for every program however quick to
    compile: a program compiled before (by an earlier run, or an identical program of a fresh
    trainer) is loaded from disk instead of compiled again."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_llm(args: argparse.Namespace, **engine_kwargs):
    from harli_jax import LLM
    from harli_jax.memory.sizing import check_memory_fraction

    cache = getattr(args, "compile_cache", "off")
    if cache != "off":
        enable_compile_cache(cache)
    fraction = getattr(args, "memory_fraction", None)
    if fraction is not None:
        try:
            check_memory_fraction(fraction)
        except ValueError as err:
            raise UsageError(str(err)) from None
        engine_kwargs.setdefault("memory_fraction", fraction)
    try:
        if args.model is None:
            return LLM.demo(**({"dtype": args.dtype} if args.dtype else {}), **engine_kwargs)
        return LLM(args.model, dtype=args.dtype or "bfloat16", **engine_kwargs)
    except MemoryError as err:  # the arena did not fit: the flag that sized it is the fix
        raise UsageError(str(err)) from None


def flag_message(message: str) -> str:
    """'LoraConfig.r must be > 0' -> '--r must be > 0': name the flag the user typed."""
    for prefix in ("LoraConfig.", "SamplingParams."):
        message = message.replace(prefix, "--")
    head, _, tail = message.partition(" ")
    return head.replace("_", "-") + " " + tail


def compile_inference(core, show: bool = True) -> float:
    """Compiles every inference program of ``core`` (an `EngineCore`) before it serves, with a
    progress bar over its shape buckets unless ``show`` is off; returns the seconds it took."""
    from tqdm import tqdm

    buckets = len(core.shape_buckets())
    with tqdm(total=buckets, desc="compiling inference", unit="program", disable=not show) as bar:
        return core.compile_all(lambda done, total: bar.update(1))
