"""The unified arena against a static split: the largest decode batch at context 2048, and how fast
fine-tuning gives its pages back.

For each model shape: an engine whose arena is sized from the device's memory
(``--memory-fraction``, less the weights, the decode programs' and the fine-tune micro-steps'
temporaries) and a LoRA job (r=16, 4x512) holding its arena pages in the middle of a step. Then:

- ``arena_max_batch``: sequences of ``--context`` tokens leased one after another until one no
  longer fits; the job yields under the pressure, so decode can take the whole arena;
- ``static_max_batch``: the same arena bytes split 50/50, KV getting half of the pages;
- ``yield_ms``: with decode holding every free page, wall time from the pressure signal (a
  one-page KV lease that does not fit) until the job's pages are free, the lease is granted and
  the last program that wrote the arena has finished (median of ``--repeats``).

Result: ``bench/results/memory-<device>.json``. ``--quick --shapes tiny`` is a CPU smoke run.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# No torch in this process: JAX takes its one preallocated pool, as a server does (a pool that
# grows on demand fragments, and a large arena then fails to allocate).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true")

from bench import common  # noqa: E402  (sets the JAX allocator mode before jax loads)

# isort: split
import jax  # noqa: E402

from bench.colocate_setup import IdTokenizer, write_data  # noqa: E402
from bench.train import LORA, ensure_checkpoint  # noqa: E402
from harli_jax import LLM  # noqa: E402
from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob, granularities  # noqa: E402
from harli_jax.lora.config import LoraConfig  # noqa: E402
from harli_jax.memory.page_table import Owner  # noqa: E402
from harli_jax.memory.sizing import temp_bytes  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def make_job(llm: LLM, data: Path, out_dir: Path, rows: int, seq_len: int) -> FineTuneJob:
    config = FineTuneConfig(
        data=data,
        out_dir=out_dir,
        lora=LoraConfig(**LORA),
        steps=1000,
        warmup_steps=1,
        batch_size=rows,
        seq_len=seq_len,
        checkpoint_every=10**6,
    )
    return FineTuneJob("bench", config, llm.model, IdTokenizer())


def hold_pages(job: FineTuneJob, micro_steps: int = 2) -> None:
    """Leaves ``job`` in the middle of a step (finest cut), holding its arena pages."""
    cut = granularities(job.trainer.num_layers, job.config.batch_size)[-1]
    for _ in range(micro_steps):
        micro = job.next_micro_step(cut)
        if micro is None:
            raise RuntimeError("the job cannot get its arena pages")
        job.run(micro)


def train_temporaries(llm: LLM, data: Path, out_dir: Path, rows: int, seq_len: int) -> int:
    """The largest temporaries of the job's micro-step programs (compiled on a first engine)."""
    job = make_job(llm, data, out_dir, rows, seq_len)
    job.use_arena(llm.engine.arena)
    cut = granularities(job.trainer.num_layers, rows)[-1]
    keys = set()
    while True:
        micro = job.next_micro_step(cut)
        keys.add(micro.key)
        job.run(micro)
        if not job.in_step:
            break
    job.yield_memory()
    return max(temp_bytes(job.trainer.executable(key)) for key in keys)


def bench_shape(shape: str, args: argparse.Namespace, work: Path) -> dict:
    ckpt = ensure_checkpoint(work, shape)
    rows, seq_len = (2, 32) if args.quick else (4, 512)
    context, page_size = args.context, 16
    probe = LLM(ckpt, dtype=args.dtype, max_num_seqs=4, max_model_len=context, max_loras=0)
    data = write_data(work / f"{shape}.jsonl", probe.model.config.vocab_size, seq_len)
    reserve = train_temporaries(probe, data, work / f"{shape}-probe", rows, seq_len)
    del probe
    gc.collect()  # its weights and arena must be gone before the sized engine measures memory
    sizing = {}
    if common._on_accelerator():
        sizing = {"memory_fraction": args.memory_fraction, "reserve_bytes": reserve}
    llm = LLM(
        ckpt,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=context,
        page_size=page_size,
        max_loras=0,
        **sizing,
    )
    arena = llm.engine.arena
    job = make_job(llm, data, work / f"{shape}-job", rows, seq_len)
    job.use_arena(arena)
    hold_pages(job)
    finetune_pages = arena.pages.used_by("finetune")
    per_seq = -(-context // page_size)
    usable = arena.pages.num_pages - arena.pages.reserved

    batch = 0  # (a) sequences at full context until one does not fit; fine-tune yields
    while arena.lease(Owner("kv", batch), per_seq):
        batch += 1
    yields_in_batch = job.yields
    for seq in range(batch):
        arena.pages.free(Owner("kv", seq))

    yield_ms = []  # (c) pressure signal -> pages free and their last writer done
    for _ in range(args.repeats):
        hold_pages(job)
        filler, probe = Owner("kv", "filler"), Owner("kv", "probe")
        arena.pages.allocate(filler, arena.pages.num_free)  # decode took every free page
        start = time.perf_counter()
        ok = arena.lease(probe, 1)  # the next token's page: only a yield can make room
        jax.block_until_ready(arena.buffer)
        yield_ms.append((time.perf_counter() - start) * 1e3)
        assert ok and not job.holds_pages
        arena.pages.free(filler)
        arena.pages.free(probe)
    return {
        "model": shape,
        "context": context,
        "arena_pages": arena.pages.num_pages,
        "page_bytes": arena.page_bytes,
        "finetune_pages": finetune_pages,
        "train_temp_bytes": reserve,
        "arena_max_batch": batch,
        "static_max_batch": (usable // 2) // per_seq,  # (b) KV gets half of the same bytes
        "static_finetune_fits": usable - usable // 2 >= finetune_pages,
        "yield_ms": statistics.median(yield_ms),
        "finetune_yields": yields_in_batch,
    }


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tinyllama-1.1b,llama3-8b")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--memory-fraction", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: small everything")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.context, args.max_num_seqs, args.repeats, args.dtype = 128, 8, 2, "float32"
    return args


def main() -> None:
    args = _parse()
    command = "python3 bench/memory.py " + shlex.join(sys.argv[1:])
    device = common.device_name()
    out = args.out or RESULTS / f"memory-{device}{'-quick' if args.quick else ''}.json"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            rows.append(bench_shape(shape, args, Path(tmp)))
            common.write_result(out, rows, command)  # each shape's row as soon as it exists
            gc.collect()  # the engine and job hold each other (yield callbacks): free the arena


if __name__ == "__main__":
    main()
