"""The fine-tuning sub-commands of ``harli-jax``: ``finetune`` (alone) and ``train-colocated``
(while serving a request trace). Each is argument parsing plus a call into the library."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from harli_jax.cli_common import UsageError, add_model_args, flag_message, load_llm
from harli_jax.lora.config import LoraConfig


def _add_job_args(
    p: argparse.ArgumentParser, steps: int, batch_size: int, seq_len: int, lr: float, targets: str
) -> None:
    p.add_argument(
        "--data", type=Path, help="training data, jsonl (text, prompt/completion or chat messages)"
    )
    p.add_argument("--out", type=Path, default=Path("harli-out"), help="output directory")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument(
        "--target-modules",
        default=targets,
        help="comma-separated HF module names, or all-linear",
    )
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)


def _job_config(args: argparse.Namespace, data: Path):
    from harli_jax.engine.finetune import FineTuneConfig

    try:
        targets = (
            args.target_modules
            if args.target_modules == "all-linear"
            else tuple(args.target_modules.split(","))
        )
        lora = LoraConfig(r=args.r, alpha=args.alpha, target_modules=targets)
        return FineTuneConfig(
            data=data,
            out_dir=args.out,
            lora=lora,
            steps=args.steps,
            lr=args.lr,
            warmup_steps=min(10, args.steps // 10),
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(flag_message(str(err))) from None


def _data_file(args: argparse.Namespace) -> Path:
    from harli_jax.demo_task import write_dataset

    if args.data is None:
        if args.model is not None:
            raise UsageError("--data is required with --model")
        return write_dataset(args.out / "demo_task.jsonl")
    if not args.data.is_file():
        raise UsageError(f"--data {args.data}: no such file")
    return args.data


def _make_job(args: argparse.Namespace, llm):
    from harli_jax.engine.finetune import FineTuneJob
    from harli_jax.lora.data import DataError

    try:
        return FineTuneJob("job", _job_config(args, _data_file(args)), llm.model, llm.tokenizer)
    except DataError as err:
        raise UsageError(str(err)) from None


def _finetune(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    llm = load_llm(args)
    job = _make_job(args, llm)
    if job.step and not args.resume:
        raise UsageError(f"--out {args.out} holds a job at step {job.step}; pass --resume")
    bar = tqdm(total=job.config.steps, initial=job.step, unit="step")
    start, tokens = time.perf_counter(), 0
    while not job.done:
        metrics = job.train_step()
        tokens += metrics["tokens"]
        rate = tokens / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{rate:.0f}")
        bar.update(1)
    bar.close()
    print(f"adapter (HF PEFT format): {job.wait_saved()}")


def _finetune_parser(sub) -> Callable:
    p = sub.add_parser("finetune", help="LoRA fine-tuning alone, with checkpoints")
    add_model_args(p)
    _add_job_args(p, steps=100, batch_size=4, seq_len=256, lr=2e-4, targets="q_proj,v_proj")
    p.add_argument("--resume", action="store_true", help="continue the job in --out")
    return _finetune


def _train_colocated(args: argparse.Namespace) -> None:
    from harli_jax.colocate import run_colocated, write_report
    from harli_jax.demo_task import accuracy
    from harli_jax.sched.config import SchedulerConfig
    from harli_jax.sched.trace import load_trace, synthetic_trace

    try:
        config = SchedulerConfig(policy=args.policy, tpot_slo_s=args.tpot_slo_ms / 1e3)
    except ValueError as err:
        raise UsageError(str(err).replace("the TPOT SLO", "--tpot-slo-ms")) from None
    llm = load_llm(
        args,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        page_size=args.page_size,
        prefill_chunk=args.prefill_chunk,
    )
    if args.trace is not None:
        try:
            trace = load_trace(args.trace)
        except (OSError, ValueError) as err:
            raise UsageError(f"--trace: {err}") from None
    else:
        if args.rate <= 0 or args.duration <= 0:
            raise UsageError("--rate and --duration must be positive")
        trace = synthetic_trace(
            args.rate,
            args.duration,
            max_len=llm.engine.max_model_len // 2,
            bursty=args.bursty,
            seed=args.seed,
            mean_prompt=args.mean_prompt,
            mean_output=args.mean_output,
        )
    job = _make_job(args, llm)
    demo = args.data is None
    before = accuracy(llm) if demo else None
    report = run_colocated(llm, job, trace, config)
    if job.done:
        llm.load_adapter("job", job.wait_saved())
    if demo:
        report["task_accuracy"] = {
            "before": before,
            "after": accuracy(llm, "job" if job.done else None),
        }
    write_report(report, args.out)
    _print_report(report, args.out)


def _print_report(report: dict, out: Path) -> None:
    training = report["while_training"]
    lines = [
        f"policy {report['policy']}, TPOT SLO {report['tpot_slo_ms']:.1f} ms",
        f"requests: {report['requests']}",
        f"TPOT p50 {report['tpot_p50_ms']:.2f} ms, p99 {report['tpot_p99_ms']:.2f} ms; "
        f"SLO attainment {100 * report['slo_attainment']:.2f}%",
        f"while fine-tuning ({training['tokens']} tokens): TPOT p99 "
        f"{training['tpot_p99_ms']:.2f} ms; SLO attainment {100 * training['slo_attainment']:.2f}%",
        f"fine-tune: {report['finetune_steps']} steps, {report['finetune_tokens']} tokens, "
        f"{report['finetune_tok_s']:.0f} tok/s",
        "predictor error (MAPE): "
        + ", ".join(
            f"{f} {100 * s['mape']:.1f}% (n={s['n']})" for f, s in report["predictor"].items()
        ),
    ]
    if "task_accuracy" in report:
        acc = report["task_accuracy"]
        lines.append(
            f"demo task (single-digit sums): accuracy {100 * acc['before']:.0f}% before,"
            f" {100 * acc['after']:.0f}% after fine-tuning"
        )
    lines.append(f"report: {out / 'report.json'}, plot: {out / 'colocation.png'}")
    print("\n".join(lines))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


def _train_colocated_parser(sub) -> Callable:
    from harli_jax.sched.config import POLICIES

    p = sub.add_parser("train-colocated", help="serve a request trace while fine-tuning")
    add_model_args(p)
    # Defaults sized for the demo task: its 100 sums are learnt in ~150 steps at this rate; 300
    # keep the job co-located for a third of the default trace on a 2-core CPU, so that its
    # while-training SLO share rests on ~1,200 TPOT samples, not ~450 (where one late iteration
    # of five running requests moved it by a point).
    _add_job_args(p, steps=300, batch_size=8, seq_len=64, lr=1e-3, targets="all-linear")
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    p.add_argument("--policy", choices=POLICIES, default="harli")
    p.add_argument("--trace", type=Path, help="jsonl of arrival_s, prompt_tokens, output_tokens")
    p.add_argument("--rate", type=float, default=4.0, help="requests/s of a synthetic trace")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of synthetic trace")
    p.add_argument("--bursty", action="store_true", help="Gamma arrivals (CV 2), not Poisson")
    p.add_argument("--mean-prompt", type=float, default=48.0)
    p.add_argument("--mean-output", type=float, default=48.0)
    # Engine shape: every (batch, context) bucket is compiled before the trace starts, so the
    # defaults keep the bucket count small enough for a CPU.
    p.add_argument("--max-num-seqs", type=int, default=16, help="largest decode batch")
    p.add_argument("--max-model-len", type=int, default=256, help="context per sequence")
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=128)
    return _train_colocated


PARSERS = {"finetune": _finetune_parser, "train-colocated": _train_colocated_parser}
