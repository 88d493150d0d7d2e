"""What every ``harli-jax`` sub-command shares: the user-error type and the model flags."""

from __future__ import annotations

import argparse


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


def load_llm(args: argparse.Namespace, **engine_kwargs):
    from harli_jax import LLM
    from harli_jax.memory.sizing import check_memory_fraction

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
