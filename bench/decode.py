"""Decode-step benchmark: our jitted step against the memory floor and HF transformers, one GPU.

For each model shape and (batch, context) it reports, in ms:
- `ours_ms`: the engine's jitted forward step (`EngineCore._forward`: write K/V, attend through the
  page table, sample one token per row) on weights our loader read from a saved random-weight
  HF checkpoint; steady state, the median over samples of 10 chained steps (cache threaded
  through, so host dispatch overlaps the device as in a serving loop). Every row samples at
  temperature 1 without top-k/top-p or top logprobs, so the program is the sampler variant the
  engine runs for such a batch (`sampler` in the row, "/draw"); the `full-sampler` variant times
  the full sampler;
- `ours_sync_ms` / `dispatch_ms`: one step launched on an idle device and waited for, and the host
  time of launching it; `engine_ms`: one `EngineCore.step()` (inputs built on the host, step,
  tokens read back), i.e. what the host side adds;
- `floor_ms`: (weight bytes + KV bytes) over the HBM bandwidth measured in this run;
- `hf_ms`: HF transformers (bf16, static cache, `torch.compile` reduce-overhead), in this process
  (`--part all`) or merged from earlier `--part hf` runs (`--hf-json`; each row names its source).
Prefill tokens/s at 1x2048 and 8x512 go to the top-level `prefill` list. A row decodes the token
at position `context - 1`, so it attends to `context` keys.

    python3 bench/decode.py                                        # everything, both baselines
    python3 bench/decode.py --part hf --out /tmp/hf.json           # HF rows alone
    python3 bench/decode.py --part ours --hf-json /tmp/hf.json     # ours, merged with those
    python3 bench/decode.py --part ours --profile --variants reference,kernel --batches 1,32
    python3 bench/decode.py --part ours --projection dot --batches 1   # one-row GEMMs, the A/B base
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402  (sets the JAX allocator mode before jax loads)
from bench.decode_bench import (  # noqa: E402
    VARIANTS,
    load_model,
    profile_projections,
    projection,
    time_decode,
    time_prefill,
)
from bench.decode_profile import chained_copy_bandwidth  # noqa: E402

PREFILL_SHAPES = ((1, 2048), (8, 512))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--models", default="tinyllama-1.1b,llama3-8b")
    parser.add_argument("--batches", type=ints, default=[1, 8, 32, 64, 128])
    parser.add_argument("--contexts", type=ints, default=[1024, 4096])
    parser.add_argument("--part", choices=("all", "ours", "hf"), default="all")
    parser.add_argument(
        "--hf-json", type=Path, nargs="+", default=[], help="hf_ms from earlier --part hf runs"
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/decode-<device>.json")
    parser.add_argument("--ckpt-root", type=Path, default=Path("/tmp/harli-bench-ckpt"))
    parser.add_argument(
        "--init-random",
        default="",
        help="models to initialise at random on the device (ours and HF) instead of loading a "
        "checkpoint",
    )
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--no-engine", action="store_true", help="skip the engine_ms column")
    parser.add_argument("--profile", action="store_true", help="kernels per step, HLO summary")
    parser.add_argument("--projections", action="store_true", help="weight-read bandwidths")
    parser.add_argument("--variants", default="", help=f"extra step variants: {sorted(VARIANTS)}")
    parser.add_argument(
        "--projection",
        choices=("dot",),
        help="trace every program of the ours part (ours_ms included) with one-row projections "
        "as this (decode_bench.projection)",
    )
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no row after this")
    return parser.parse_args()


def _checkpoint(args: argparse.Namespace, name: str) -> Path:
    from bench.make_checkpoint import save_random_checkpoint

    directory = args.ckpt_root / name
    if not (directory / "model.safetensors.index.json").is_file():
        start = time.perf_counter()
        save_random_checkpoint(directory, name, "bfloat16")
        print(f"{name}: wrote checkpoint in {time.perf_counter() - start:.0f} s", flush=True)
    return directory


def _config_only(args: argparse.Namespace, name: str) -> Path:
    """A directory holding ``name``'s config.json alone: HF builds random weights from it."""
    from transformers import LlamaConfig

    directory = args.ckpt_root / f"{name}-config"
    LlamaConfig(**common.SHAPES[name]).save_pretrained(directory)
    return directory


def _hf_part(args, names, rows, prefill, started) -> None:
    from bench import hf_baseline

    for name in names:
        ckpt = _config_only(args, name) if name in args.init_random.split(",") else None
        ckpt = ckpt or _checkpoint(args, name)
        for context in args.contexts:
            for batch in args.batches:
                if time.perf_counter() - started > args.deadline_s:
                    return
                row = rows.setdefault((name, batch, context), _row(args, name, batch, context))
                row["hf_ms"] = hf_baseline.hf_decode_step_ms(ckpt, batch, context)
                _save(args, rows, prefill, {}, partial=True)
        if not args.no_prefill:
            for batch, length in PREFILL_SHAPES:
                if time.perf_counter() - started > args.deadline_s:
                    return
                entry = prefill.setdefault((name, batch, length), _prefill_row(name, batch, length))
                entry["hf_tok_s"] = hf_baseline.hf_prefill_tok_s(ckpt, batch, length)
        hf_baseline.free_torch()


def _ours_part(args, names, rows, prefill, extra, started) -> None:
    variants = [v for v in args.variants.split(",") if v]
    for name in names:
        random_init = name in args.init_random.split(",")
        model, load_s = load_model(name, None if random_init else _checkpoint(args, name))
        how = "random init" if random_init else "loaded from checkpoint"
        print(f"{name}: model ready in {load_s:.0f} s ({how})", flush=True)
        if args.projections:
            extra.setdefault("projections", {})[name] = profile_projections(
                common.SHAPES[name], args.batches
            )
        for context in args.contexts:
            for batch in args.batches:
                if time.perf_counter() - started > args.deadline_s:
                    return
                row = rows.setdefault((name, batch, context), _row(args, name, batch, context))
                row.update(
                    time_decode(
                        model, batch, context, variants, args.profile, engine=not args.no_engine
                    )
                )
                gc.collect()
                print(json.dumps(row), flush=True)
                _save(args, rows, prefill, extra, partial=True)
        if not args.no_prefill:
            for batch, length in PREFILL_SHAPES:
                entry = prefill.setdefault((name, batch, length), _prefill_row(name, batch, length))
                entry["ours_tok_s"] = time_prefill(model, batch, length)
        del model
        gc.collect()


def _row(args: argparse.Namespace, name: str, batch: int, context: int) -> dict[str, Any]:
    floor = common.decode_floor_ms(common.SHAPES[name], batch, context, bw=args.bandwidth)
    return dict(model=name, batch=batch, context=context, ours_ms=None, floor_ms=floor, hf_ms=None)


def _prefill_row(name: str, batch: int, length: int) -> dict[str, Any]:
    return dict(model=name, batch=batch, length=length, ours_tok_s=None, hf_tok_s=None)


def _merge_hf(path: Path, rows: dict, prefill: dict) -> None:
    earlier = json.loads(path.read_text())
    for old in earlier["rows"]:
        key = (old["model"], old["batch"], old["context"])
        if key in rows:
            rows[key]["hf_ms"] = old.get("hf_ms")
            rows[key]["hf_source"] = f"{path.name} ({earlier.get('device')}, separate run)"
    for old in earlier.get("prefill", []):
        key = (old["model"], old["batch"], old["length"])
        if key in prefill:
            prefill[key]["hf_tok_s"] = old.get("hf_tok_s")


def _split_details(rows: dict, extra: dict) -> None:
    """Moves variants, profiles and HLO summaries out of the rows (which stay flat) into
    ``extra["details"]``, keyed ``model/batch/context``."""
    for row in rows.values():
        nested = {k: row.pop(k) for k in [k for k, v in row.items() if isinstance(v, dict)]}
        if nested:
            nested |= {"ours_ms": row.get("ours_ms"), "compile_s": row.get("first_call_s")}
            extra.setdefault("details", {})[f"{row['model']}/{row['batch']}/{row['context']}"] = (
                nested
            )


def _details_table(extra: dict) -> None:
    """One line per measured program: time, kernels per step, GPU busy and span per step."""
    table = []
    for key, nested in extra.get("details", {}).items():
        programs = {"main": nested} | {
            k: v for k, v in nested.items() if isinstance(v, dict) and "ours_ms" in v
        }
        for name, info in programs.items():
            kernels = info.get("kernels") or {}
            ops = (info.get("hlo") or {}).get("ops", {})
            table.append(
                {
                    "row": key,
                    "program": name,
                    "ms": info.get("ours_ms"),
                    "kernels": kernels.get("kernels_per_step"),
                    "busy_us": kernels.get("busy_us_per_step"),
                    "span_us": kernels.get("span_us_per_step"),
                    "hlo_launch": sum(ops.values()) if ops else None,
                    "compile_s": info.get("compile_s"),
                }
            )
    if table:
        print(common.format_table(table))


def _finish(rows: dict) -> list[dict[str, Any]]:
    device = common.device_name()
    out = []
    for row in rows.values():
        ours, hf, floor = row.get("ours_ms"), row.get("hf_ms"), row["floor_ms"]
        row["device"] = device
        row["ours_over_floor"] = ours / floor if ours else None
        row["ours_over_hf"] = ours / hf if ours and hf else None
        out.append(row)
    return out


def _save(args, rows, prefill, extra, partial: bool = False) -> None:
    path = args.out or Path(__file__).parent / "results" / f"decode-{common.device_name()}.json"
    top = dict(
        bandwidth_gb_s=args.bandwidth / 1e9,
        prefill=list(prefill.values()),
        **extra,
    )
    command = "python3 " + " ".join(sys.argv)
    if partial:
        payload = {"command": command, "device": common.device_name(), "rows": list(rows.values())}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload | top, indent=1, default=str) + "\n")
    else:
        common.write_result(path, _finish(rows), command, **top)


def _summary(rows: dict, prefill: dict) -> None:
    """The short table printed last: ratios against both baselines."""
    table = []
    for r in rows.values():
        table.append(
            {
                "model": r["model"][:9],
                "B": r["batch"],
                "ctx": r["context"],
                "ours": r.get("ours_ms"),
                "floor": r["floor_ms"],
                "hf": r.get("hf_ms"),
                "xfloor": r.get("ours_over_floor"),
                "xhf": r.get("ours_over_hf"),
                "sync": r.get("ours_sync_ms"),
                "engine": r.get("engine_ms"),
            }
        )
    print(common.format_table(table))
    if prefill:
        print(common.format_table(list(prefill.values())))


def main() -> None:
    args = _parse()
    started = time.perf_counter()
    names = args.models.split(",")
    rows: dict[tuple, dict[str, Any]] = {}
    prefill: dict[tuple, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    # The floor uses the higher of two copy probes: the lower one still carries per-call overhead.
    probes = {
        "common.measure_hbm_bandwidth_jax": common.measure_hbm_bandwidth_jax(),
        "decode_profile.chained_copy_bandwidth": chained_copy_bandwidth(),
    }
    args.bandwidth = max(probes.values())  # bytes/s
    extra["bandwidth_probes_gb_s"] = {name: bw / 1e9 for name, bw in probes.items()}
    print(f"HBM bandwidth {extra['bandwidth_probes_gb_s']} GB/s", flush=True)
    if args.part in ("all", "hf"):
        _hf_part(args, names, rows, prefill, started)
    if args.part in ("all", "ours"):
        with projection(args.projection):
            _ours_part(args, names, rows, prefill, extra, started)
        extra["projection"] = args.projection
    for path in args.hf_json:
        _merge_hf(path, rows, prefill)
    _split_details(rows, extra)
    _save(args, rows, prefill, extra)
    _details_table(extra)
    _summary(rows, prefill)


if __name__ == "__main__":
    main()
