"""``harli-jax profile``: calibrate the latency predictor offline and save it, so that ``serve``
and ``train-colocated`` start calibrated (``--profile FILE``); and the check those commands make
that a profile was made for their model, device, engine shape and LoRA shape.

A profile is the predictor's JSON (`Predictor.save`: device rates, every program's stage-1 cost,
the stage-2 samples and error record) with ``meta`` beside it: what it was made for (the device
kind, the model directory's identity, the engine shape, the LoRA job shape), the program keys, the
scheduler's `Calibration` (each cut's micro-steps and calibrated times, the inference steps'
times) and the per-family error statistics of a scored pass. Default location:
``~/.cache/harli-jax/profiles/<model>-<identity>-<device>.json`` (never the model directory, which
may be read-only or shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harli_jax.cli_common import UsageError, add_model_args, compile_inference, load_llm

PROFILE_KIND = "harli-jax-profile"
ENGINE_PRESETS = {
    # The engine shapes of the commands that take --profile (their defaults).
    "train-colocated": dict(max_num_seqs=16, max_model_len=256, page_size=32, prefill_chunk=128),
    "serve": dict(max_num_seqs=32, max_model_len=None, page_size=16, prefill_chunk=256),
}


def model_identity(model: str | None, dtype: str | None) -> dict:
    """The model directory's identity: its name, a hash of config.json and of the weight files'
    names and sizes, and the dtype it is served in."""
    from harli_jax.llm import DEMO_DIR

    directory = Path(model) if model is not None else Path(DEMO_DIR)
    digest = hashlib.sha256()
    config = directory / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for weights in sorted(directory.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    resolved = dtype or ("float32" if model is None else "bfloat16")
    return {"name": directory.name, "hash": digest.hexdigest()[:16], "dtype": resolved}


def device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def engine_shape(core) -> dict:
    return dict(
        max_num_seqs=core.config.max_num_seqs,
        max_model_len=core.max_model_len,
        page_size=core.config.page_size,
        prefill_chunk=core.config.prefill_chunk,
    )


def lora_shape(r: int, target_modules: str, batch_size: int, seq_len: int) -> str | None:
    """`calibration.job_shape` of the job these CLI flags make (a bad flag: None, which no
    profile matches; the command itself reports the flag)."""
    from harli_jax.lora.config import LoraConfig

    split = target_modules if target_modules == "all-linear" else tuple(target_modules.split(","))
    try:
        targets = LoraConfig(r=r, target_modules=split).target_modules
    except ValueError:
        return None
    return f"r{r}-{'.'.join(targets)}-{batch_size}x{seq_len}"


def default_path(identity: dict, device: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    name = f"{identity['name']}-{identity['hash'][:8]}-{slug}.json"
    return Path.home() / ".cache" / "harli-jax" / "profiles" / name


def read_profile(path: Path, expected: dict):
    """The (Predictor, Calibration) a profile holds; UsageError naming ``--profile`` if it was
    made for something other than ``expected`` (keys among device, model, engine, lora)."""
    from harli_jax.sched.calibration import Calibration
    from harli_jax.sched.predictor import Predictor

    try:
        predictor, meta = Predictor.load_with_meta(path)
    except FileNotFoundError:
        raise UsageError(f"--profile {path}: no such file") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--profile {path}: {err}") from None
    if meta.get("kind") != PROFILE_KIND:
        raise UsageError(f"--profile {path}: not a file written by `harli-jax profile`")
    for what, value in expected.items():
        if meta.get(what) != value:
            raise UsageError(
                f"--profile {path} was made for {what} {json.dumps(meta.get(what))}, not "
                f"{json.dumps(value)}; run `harli-jax profile` for this setup, or drop --profile"
            )
    return predictor, Calibration.from_json(meta.get("calibration", {}))


def _inference_pass(llm, scheduler, decode_steps: int = 4) -> None:
    """Decodes ``decode_steps`` tokens at every (decode rows bucket, pages bucket), prefilling
    prompts long enough to reach the pages bucket (so every prefill chunk bucket runs too)."""
    from harli_jax.engine.sampling import SamplingParams

    core = llm.engine
    page = core.config.page_size
    buckets = core.shape_buckets()
    rows_buckets = sorted({r for r, width, _ in buckets if width == 1})
    pages_buckets = sorted({p for _, width, p in buckets if width == 1})
    params = SamplingParams(max_tokens=decode_steps, ignore_eos=True)
    for rows in rows_buckets:
        for pages in pages_buckets:
            prompt = max(1, min(pages * page, core.max_model_len) - decode_steps - 1)
            for i in range(rows):
                core.add_request([3 + (i + j) % 50 for j in range(prompt)], params)
            while core.has_unfinished():
                core.step()
                if core.last_report is not None:
                    scheduler.observe_inference(core.last_report, calibrating=True)


def _profile(args: argparse.Namespace) -> None:
    from harli_jax.demo_task import write_dataset
    from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob
    from harli_jax.engine.metrics import EngineMetrics
    from harli_jax.lora.config import LoraConfig
    from harli_jax.lora.data import DataError
    from harli_jax.sched.calibration import job_shape
    from harli_jax.sched.config import SchedulerConfig
    from harli_jax.sched.predictor import Predictor
    from harli_jax.sched.roofline import measure_device_rates
    from harli_jax.sched.runner import cuts
    from harli_jax.sched.scheduler import ColocationScheduler

    if args.tpot_slo_ms <= 0:
        raise UsageError(f"--tpot-slo-ms={args.tpot_slo_ms} must be positive")
    if args.data is not None and not args.data.is_file():
        raise UsageError(f"--data {args.data}: no such file")
    start = time.perf_counter()
    engine_args = dict(ENGINE_PRESETS[args.engine])
    for name in engine_args:
        if getattr(args, name) is not None:
            engine_args[name] = getattr(args, name)
    rates = measure_device_rates()  # before the model and its KV cache claim device memory
    llm = load_llm(args, **engine_args)
    work = Path(tempfile.mkdtemp(prefix="harli-profile-"))
    targets = args.target_modules
    try:
        lora = LoraConfig(
            r=args.r,
            alpha=args.alpha,
            target_modules=targets if targets == "all-linear" else tuple(targets.split(",")),
        )
        config = FineTuneConfig(
            data=args.data or write_dataset(work / "demo_task.jsonl"),
            out_dir=work / "job",
            lora=lora,
            steps=1_000_000,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            checkpoint_every=1_000_000,
        )
        job = FineTuneJob("profile", config, llm.model, llm.tokenizer)
    except (ValueError, DataError) as err:
        raise UsageError(str(err).replace("LoraConfig.", "--")) from None
    scheduler = ColocationScheduler(
        SchedulerConfig(policy="harli", tpot_slo_s=args.tpot_slo_ms / 1e3),
        Predictor(rates),
        EngineMetrics(),
    )
    core = llm.engine
    compile_s = compile_inference(core)
    print(f"compiled {len(core.shape_buckets())} inference programs in {compile_s:.1f} s")
    print("compiling and measuring every cut of the train step ...", flush=True)
    scheduler.runner.calibrate(job)
    print("measuring inference steps over the shape buckets ...", flush=True)
    _inference_pass(llm, scheduler)
    # A scored pass: each measurement is compared with the prediction made just before it.
    scheduler.predictor.clear_errors()
    _inference_pass(llm, scheduler)
    for option in cuts(job):
        scheduler.runner.run_step(job, option)
    errors = {f: scheduler.predictor.error_stats(f) for f in scheduler.predictor.families()}
    identity = model_identity(args.model, args.dtype)
    device = device_kind()
    meta = {
        "kind": PROFILE_KIND,
        "device": device,
        "model": identity,
        "engine": engine_shape(core),
        "lora": job_shape(job),
        "tpot_slo_ms": args.tpot_slo_ms,
        "programs": scheduler.predictor.keys(),
        "calibration": scheduler.calibration.to_json(),
        "errors": errors,
        "created": time.time(),
    }
    out = args.out or default_path(identity, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    scheduler.predictor.save(out, meta=meta)
    print(f"{'family':<14} {'n':>5} {'MAPE %':>8} {'p99 rel. err. %':>16}")
    for family, stats in errors.items():
        if stats["n"]:
            print(
                f"{family:<14} {stats['n']:>5} {100 * stats['mape']:>8.1f}"
                f" {100 * stats['p99_rel_error']:>16.1f}"
            )
    print(f"profile ({len(meta['programs'])} programs): {out}")
    print(f"profiled in {time.perf_counter() - start:.1f} s")


def add_profile_parser(sub) -> Callable:
    p = sub.add_parser(
        "profile", help="calibrate the latency predictor offline and save it (--profile FILE)"
    )
    add_model_args(p)
    p.add_argument(
        "--out",
        type=Path,
        help="profile file (default: ~/.cache/harli-jax/profiles/<model>-<id>-<device>.json)",
    )
    p.add_argument(
        "--engine",
        choices=sorted(ENGINE_PRESETS),
        default="train-colocated",
        help="whose engine shape to profile (the command's defaults; flags below override)",
    )
    for flag in ("--max-num-seqs", "--max-model-len", "--page-size", "--prefill-chunk"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--data", type=Path, help="jsonl to draw train batches from (default: demo)")
    # The LoRA job shape, as train-colocated takes it (train programs are keyed by it).
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    return _profile
