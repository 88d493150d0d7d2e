"""LoRA train throughput (issue 4, point 8): our train step against HF PEFT, and micro-step sizes.

For each model shape and batch (rows x seq_len tokens) it reports train tokens/s of
- `ours_tok_s`: `Trainer.train_step` (one jitted program: forward, backward, AdamW update) of a
  `from_pretrained` bf16 model with LoRA r=16, alpha 32 on all seven linear layers, on random
  tokens (loss on every token, one example per row); median of `--steps` steps after `--warmup`,
  each blocked on its loss;
- `peft_tok_s`: HF PEFT + torch bf16 with the same adapter, in this process (`peft_train_tok_s`;
  torch runs first, then frees the GPU for JAX); `ratio` = ours / PEFT.
A point that runs out of device memory on either side is measured again with layer
rematerialisation on that side (ours: `Trainer(remat=True)`; PEFT: transformers' non-reentrant
gradient checkpointing); its row says so (`remat`, `ours_remat`, `peft_remat`). A point that runs
out of memory even so is recorded as None and named in `notes`. `--remat` measures every point
with both sides rematerialising.

Results merge into `train-<device>.json` under `--out`: a run replaces the rows (and micro-step
and cut rows) of the (model, tokens) points it measured and keeps the others, and `commands` lists
every command that wrote the file (`command` is the last), so shapes can be measured in separate
runs into one file.

The co-location scheduler runs a train step cut into micro-steps (`Trainer.plan`). For the first
shape and batch (`--micro-shapes`, `--micro-tokens`), every cut that
`harli_jax.engine.finetune.granularities` offers runs as plans whose micro-steps are each blocked
on and timed: the `micro_steps` list holds the median per program (kind, key), the `cuts` list
each cut's whole step (sum of its micro-steps) against the uncut step.

    python3 bench/train.py                                     # TinyLlama-1.1B, ~3-4 min on an H100
    python3 bench/train.py --shapes tinyllama-1.1b,llama3-8b   # adds Llama-3-8B
    python3 bench/train.py --shapes tiny --quick               # CPU smoke run of every path
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402  (sets the JAX allocator mode before jax loads)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from harli_jax.cli_common import enable_compile_cache  # noqa: E402

LORA = dict(r=16, alpha=32, target_modules="all-linear")
Point = tuple[int, int]  # (rows, seq_len)


def ensure_checkpoint(root: Path, shape: str) -> Path:
    """The random-weight bf16 checkpoint of `shape` under `root`, written once and reused."""
    from bench.make_checkpoint import save_random_checkpoint

    directory = root / shape
    if not (directory / "model.safetensors.index.json").is_file():
        start = time.perf_counter()
        save_random_checkpoint(directory, shape, "bfloat16")
        print(f"{shape}: wrote checkpoint in {time.perf_counter() - start:.0f} s", flush=True)
    return directory


def _point(row: dict) -> tuple[str, str]:
    return row["model"], row["tokens"]


def merge_results(previous: dict, rows: list[dict], command: str, **top) -> dict:
    """This run's result merged into ``previous`` (the file's earlier content, ``{}`` if none).

    `rows`, `micro_steps` and `cuts` rows of a (model, tokens) point this run measured replace
    the earlier ones, others are kept (earlier points first); `notes` follow their points the same
    way; `commands` gains ``command``. Other keys of ``top`` (``lora``, ``wall_s``...) are this
    run's; a key this run does not set keeps its earlier value.
    """
    merged = {k: v for k, v in previous.items() if k not in ("partial", "device", "rows")}
    measured = {_point(row) for row in rows}
    tables = {"rows": rows, **{k: top.pop(k) for k in ("micro_steps", "cuts") if k in top}}
    for name, new in tables.items():
        points = {_point(row) for row in new} | (measured if name == "rows" else set())
        kept = [row for row in previous.get(name, []) if _point(row) not in points]
        merged[name] = kept + list(new)
    if "notes" in top:
        prefixes = tuple(f"{model} {tokens}:" for model, tokens in measured)
        kept = [note for note in previous.get("notes", []) if not note.startswith(prefixes)]
        merged["notes"] = kept + [n for n in top.pop("notes") if n not in kept]
    earlier = previous.get("commands") or ([previous["command"]] if "command" in previous else [])
    merged.update(top, commands=[*earlier, command])
    return merged


def read_result(path: Path) -> dict:
    """The result file at ``path`` as written before this run, or ``{}``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def save(path: Path, previous: dict, rows: list[dict], final: bool = False, **top) -> None:
    """Writes this run's results merged into ``previous``; until ``final``, quietly and marked
    partial, so results so far survive a timeout."""
    command = shlex.join(["python3", *sys.argv])
    merged = merge_results(previous, rows, command, **top)
    rows = merged.pop("rows")
    merged.pop("command", None)
    if final:
        common.write_result(path, rows, command, **merged)
        return
    with contextlib.redirect_stdout(io.StringIO()):
        common.write_result(path, rows, command, partial=True, **merged)


def random_batch(vocab_size: int, rows: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A packed batch of one random example per row, every token a training target."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(rows, seq_len + 1), dtype=np.int32)
    ones = np.ones((rows, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len))
    return dict(
        tokens=ids[:, :-1],
        targets=ids[:, 1:],
        loss_mask=ones,
        segment_ids=ones,
        positions=positions,
    )


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _trainer(base, remat: bool = False):
    from flax import nnx

    from harli_jax.lora import LoraConfig, Trainer, inject_lora, make_optimizer

    # A fresh module tree over the base arrays, as a fine-tune job builds it.
    model = inject_lora(nnx.merge(*nnx.split(base)), LoraConfig(**LORA), slots=1, rngs=nnx.Rngs(0))
    # A long schedule, so the timed steps train at a non-zero learning rate like any other.
    return Trainer(model, make_optimizer(2e-4, total_steps=100_000, warmup_steps=10), remat=remat)


Measure = Callable[[bool], "float | None"]  # remat -> tokens/s, or None on out-of-memory


def with_remat_retry(measure: Measure, remat: bool = False) -> tuple[float | None, bool]:
    """``(tokens/s, remat)``: measured without rematerialisation unless ``remat``, then with it
    if that ran out of memory (None if it still does)."""
    if not remat:
        value = measure(False)
        if value is not None:
            return value, False
    return measure(True), True


def peft_points(
    ckpt: Path, points: list[Point], steps: int, warmup: int, remat: bool = False
) -> dict[Point, tuple[float | None, bool]]:
    """PEFT ``(tokens/s, gradient checkpointing)`` per point, checkpointing as
    `with_remat_retry` says; frees torch's GPU memory after."""
    from bench import hf_baseline

    results = {}
    for rows, seq_len in points:

        def measure(checkpointing: bool, rows=rows, seq_len=seq_len) -> float | None:
            # transformers checkpoints without re-entrance (use_reentrant=False) by default.
            return hf_baseline.peft_train_tok_s(
                ckpt,
                rows,
                seq_len,
                r=LORA["r"],
                alpha=LORA["alpha"],
                targets="all-linear",
                steps=steps,
                warmup=warmup,
                gradient_checkpointing=checkpointing,
            )

        results[rows, seq_len] = with_remat_retry(measure, remat)
    hf_baseline.free_torch()
    return results


def ours_tok_s(base, point: Point, steps: int, warmup: int, remat: bool = False) -> float | None:
    """Tokens/s of whole train steps at `point`; None if it ran out of device memory."""
    rows, seq_len = point
    label = f"ours train B={rows} T={seq_len}{' remat' if remat else ''}"
    batch = random_batch(base.config.vocab_size, rows, seq_len)
    trainer = _trainer(base, remat)
    try:
        start = time.perf_counter()
        for _ in range(warmup):
            jax.block_until_ready(trainer.train_step(batch)["loss"])
        warmup_s = time.perf_counter() - start
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(trainer.train_step(batch)["loss"])
            samples.append(time.perf_counter() - start)
    except Exception as error:  # XLA reports device OOM as a generic runtime error
        if not _out_of_memory(error):
            raise
        print(f"{label}: out of device memory, skipped", flush=True)
        return None
    finally:
        del trainer
        gc.collect()
    step_s = float(np.median(samples))
    tok_s = rows * seq_len / step_s
    print(
        f"{label}: {step_s * 1e3:.2f} ms/step, {tok_s:.4g} tok/s; warm-up {warmup_s:.1f} s",
        flush=True,
    )
    return tok_s


def micro_steps(base, model_name: str, point: Point, repeats: int) -> tuple[list, list]:
    """Times every micro-step of every cut at `point`: (per-program rows, per-cut rows)."""
    from harli_jax.engine.finetune import granularities

    rows, seq_len = point
    tokens = f"{rows}x{seq_len}"
    batch = random_batch(base.config.vocab_size, rows, seq_len, seed=1)
    trainer = _trainer(base)
    samples: dict[tuple[str, tuple], list[float]] = defaultdict(list)
    cut_rows = []
    for chunks, spans in granularities(trainer.num_layers, rows):
        cut = f"{rows // chunks} rows x {max(b - a for a, b in spans)} layers"
        start = time.perf_counter()
        # Compiles what this cut adds; blocked on, so the first timed micro-step waits for nothing.
        jax.block_until_ready(trainer.run_plan(trainer.plan(batch, chunks, spans)))
        compile_s = time.perf_counter() - start
        totals, keys = [], []
        for _ in range(repeats):
            plan, total = trainer.plan(batch, chunks, spans), 0.0
            keys = [(micro.kind, micro.key) for micro in plan]
            for micro in plan:
                start = time.perf_counter()
                jax.block_until_ready(micro.run())
                elapsed = time.perf_counter() - start
                samples[micro.kind, micro.key].append(elapsed)
                total += elapsed
            totals.append(total)
        medians = [np.median(samples[key]) for key in keys]
        cut_rows.append(
            dict(
                model=model_name,
                tokens=tokens,
                cut=cut,
                micro_steps=len(keys),
                step_ms=float(np.median(totals)) * 1e3,
                largest_ms=float(max(medians)) * 1e3,
            )
        )
        print(
            f"cut {cut}: step {cut_rows[-1]['step_ms']:.2f} ms in {len(keys)} micro-steps, "
            f"largest {cut_rows[-1]['largest_ms']:.2f} ms; first plan {compile_s:.1f} s",
            flush=True,
        )
    whole = cut_rows[0]["step_ms"]
    for row in cut_rows:
        row["over_uncut"] = row["step_ms"] / whole
    micro_rows = [
        dict(
            model=model_name,
            tokens=tokens,
            kind=kind,
            key="/".join(str(part) for part in key),
            median_ms=float(np.median(times)) * 1e3,
            n=len(times),
        )
        for (kind, key), times in samples.items()
    ]
    del trainer
    gc.collect()
    return micro_rows, cut_rows


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tinyllama-1.1b", help="comma-separated SHAPES names")
    parser.add_argument("--tokens", help="rows x seq_len points (default 4x512,16x512)")
    parser.add_argument("--micro-tokens", help="point of the micro-step table (default: first)")
    parser.add_argument(
        "--micro-shapes", help="shapes of the micro-step tables (default: the first; '' for none)"
    )
    parser.add_argument("--no-peft", action="store_true", help="skip the HF PEFT baseline")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed plans per cut")
    parser.add_argument("--quick", action="store_true", help="short sequences and few steps")
    parser.add_argument(
        "--remat",
        action="store_true",
        help="rematerialise on both sides at every point (default: only to retry on OOM)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--ckpt-root", type=Path, default=Path("/tmp/harli-bench-ckpt"))
    parser.add_argument("--jax-cache", type=Path, default=Path("/tmp/harli-bench-jax-cache"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    args.tokens = args.tokens or ("4x128,16x128" if args.quick else "4x512,16x512")
    return args


def _points(text: str) -> list[Point]:
    return [tuple(int(n) for n in item.split("x")) for item in text.split(",") if item]


def main() -> None:
    args = _parse()
    started = time.perf_counter()
    enable_compile_cache(args.jax_cache)
    shapes = [s for s in args.shapes.split(",") if s]
    points = _points(args.tokens)
    micro_point = _points(args.micro_tokens)[0] if args.micro_tokens else points[0]
    micro_shapes = shapes[:1] if args.micro_shapes is None else args.micro_shapes.split(",")
    ckpts = {shape: ensure_checkpoint(args.ckpt_root, shape) for shape in shapes}
    peft: dict[str, dict] = {}
    if not args.no_peft:
        for shape in shapes:
            peft[shape] = peft_points(ckpts[shape], points, args.steps, args.warmup, args.remat)

    from harli_jax.models.loading import from_pretrained

    result = args.out / f"train-{common.device_name()}.json"
    previous = read_result(result)
    rows, micro_rows, cut_rows, notes = [], [], [], []
    for shape in shapes:
        start = time.perf_counter()
        base = from_pretrained(ckpts[shape], jnp.bfloat16)
        print(f"{shape}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
        for point in points:
            measure = functools.partial(ours_tok_s, base, point, args.steps, args.warmup)
            ours = with_remat_retry(measure, args.remat)
            theirs = peft.get(shape, {}).get(point)
            rows.append(point_row(shape, point, ours, theirs, notes, forced=args.remat))
            save(result, previous, rows, notes=notes)
        if shape in micro_shapes:
            micro, cuts = micro_steps(base, shape, micro_point, args.repeats)
            micro_rows += micro
            cut_rows += cuts
            save(result, previous, rows, notes=notes, micro_steps=micro_rows, cuts=cut_rows)
        del base
        gc.collect()

    if micro_rows:
        print(common.format_table(micro_rows))
        print(common.format_table(cut_rows))
    for note in notes:
        print(note)
    save(
        result,
        previous,
        rows,
        final=True,
        lora={**LORA, "optimizer": "AdamW, clip 1.0", "loss": "every token"},
        micro_steps=micro_rows,
        cuts=cut_rows,
        notes=notes,
        wall_s=time.perf_counter() - started,
    )


def point_row(
    shape: str,
    point: Point,
    ours: tuple[float | None, bool],
    peft: tuple[float | None, bool] | None,
    notes: list[str],
    forced: bool = False,
) -> dict:
    """The result row of one point from each side's ``(tokens/s, remat)`` (``peft`` None when
    not measured); appends to ``notes`` what ran out of memory (``forced``: remat was asked
    for, not a retry)."""
    tokens = "x".join(map(str, point))
    (ours_value, ours_remat), (peft_value, peft_remat) = ours, peft or (None, False)
    sides = [("ours", *ours)] + ([("peft", *peft)] if peft is not None else [])
    for side, value, remat in sides:
        if value is None:
            notes.append(f"{shape} {tokens}: {side} ran out of device memory")
        elif remat and not forced:
            notes.append(f"{shape} {tokens}: {side} ran out of device memory without remat")
    return dict(
        model=shape,
        tokens=tokens,
        ours_tok_s=ours_value,
        peft_tok_s=peft_value,
        ratio=ours_value / peft_value if ours_value and peft_value else None,
        remat=ours_remat or peft_remat,
        ours_remat=ours_remat,
        peft_remat=peft_remat,
        device=common.device_name(),
    )


if __name__ == "__main__":
    main()
