"""The ``harli-jax`` command line: one sub-command per job, each a thin shell over the library.

Owns argument parsing and turning library errors into one-line messages that name the bad flag
or file (exit status 2), never a traceback for a user mistake.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from harli_jax.cli_common import (
    UsageError,
    add_model_args,
    compile_inference,
    flag_message,
    load_llm,
)
from harli_jax.cli_finetune import PARSERS
from harli_jax.cli_profile import (
    add_profile_parser,
    device_kind,
    engine_shape,
    lora_shape,
    model_identity,
    read_profile,
)
from harli_jax.models.config import CheckpointError


def _generate(args: argparse.Namespace) -> None:
    from harli_jax import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
        )
    except ValueError as err:
        raise UsageError(flag_message(str(err))) from None
    llm = load_llm(args)
    for out in llm.generate(args.prompt, params):
        print(out.text)


def _generate_parser(sub) -> Callable:
    p = sub.add_parser("generate", help="generate text for one or more prompts")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    return _generate


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from harli_jax.engine.jobs import JobManager
    from harli_jax.sched.predictor import Predictor
    from harli_jax.sched.roofline import measure_device_rates
    from harli_jax.serve import create_app

    if args.max_queued < 1:
        raise UsageError(f"--max-queued={args.max_queued} must be at least 1")
    if args.tpot_slo_ms <= 0:
        raise UsageError(f"--tpot-slo-ms={args.tpot_slo_ms} must be positive")
    rates = measure_device_rates()  # before the model and its KV cache claim device memory
    llm = load_llm(args)
    predictor, calibration = Predictor(rates), None
    if args.profile is not None:
        expected = {
            "device": device_kind(),
            "model": model_identity(args.model, args.dtype),
            "engine": engine_shape(llm.engine),
        }
        predictor, calibration = read_profile(args.profile, expected)
    name = args.served_model_name or (Path(args.model).name if args.model else "harli-demo")
    jobs = JobManager.colocated(
        llm.engine,
        name,
        args.state_dir / "jobs",
        tpot_slo_s=args.tpot_slo_ms / 1e3,
        max_queued=args.max_queued,
        predictor=predictor,
    )
    if calibration is not None:  # jobs of the profiled LoRA shape start with known cuts
        jobs.scheduler.calibration = calibration
    # Compiled on first use instead, a bucket's first request would wait for its program.
    compile_s = compile_inference(llm.engine)
    print(f"compiled {len(llm.engine.shape_buckets())} inference programs in {compile_s:.1f} s")
    engine = jobs.engine.start()
    app = create_app(
        engine,
        name,
        api_key=args.api_key,
        jobs=jobs,
        files_dir=args.state_dir / "files",
        tpot_slo_ms=args.tpot_slo_ms,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port)
    finally:
        engine.stop()


def _serve_parser(sub) -> Callable:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("HARLI_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: $HARLI_API_KEY)",
    )
    p.add_argument(
        "--served-model-name", help="the `model` clients ask for (default: the directory's name)"
    )
    p.add_argument("--max-queued", type=int, default=256, help="requests in flight before 429")
    p.add_argument(
        "--tpot-slo-ms",
        type=float,
        default=50.0,
        help="TPOT SLO: fine-tuning runs in the slack it leaves, and /metrics reports on it",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path("harli-state"),
        help="uploaded files and fine-tuning jobs (files/, jobs/); jobs resume from it",
    )
    _add_profile_arg(p)
    return _serve


def _add_profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        type=Path,
        help="start the latency predictor from this `harli-jax profile` file (made for this "
        "model, device and engine shape)",
    )


def _train_colocated_with_profile(handler: Callable) -> Callable:
    """``train-colocated`` starting from ``--profile`` (checked before the model loads)."""

    def run(args: argparse.Namespace) -> None:
        if args.profile is None:
            return handler(args)
        from harli_jax.colocate import start_from

        expected = {
            "device": device_kind(),
            "model": model_identity(args.model, args.dtype),
            "engine": dict(
                max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len,
                page_size=args.page_size,
                prefill_chunk=args.prefill_chunk,
            ),
            "lora": lora_shape(args.r, args.target_modules, args.batch_size, args.seq_len),
        }
        with start_from(*read_profile(args.profile, expected)):
            return handler(args)

    return run


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(
        prog="harli-jax",
        description="Co-located LLM serving and LoRA fine-tuning on one accelerator.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {"generate": _generate_parser(sub), "serve": _serve_parser(sub)}
    handlers.update({name: make(sub) for name, make in PARSERS.items()})
    handlers["profile"] = add_profile_parser(sub)
    _add_profile_arg(sub.choices["train-colocated"])
    handlers["train-colocated"] = _train_colocated_with_profile(handlers["train-colocated"])
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        handlers[args.command](args)
    except (UsageError, CheckpointError, FileNotFoundError) as err:
        print(f"harli-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
