"""Host time of starting a co-located train step (issue 6), on the CPU: before and after a change.

A start (what `harli_jax.sched.step_starts.StepStarts` times: `FineTuneJob.next_micro_step` with
no step open) leases the step's arena pages, takes its next batch and plans its micro-steps. It
is host work only, and on the GPU hosts it outlasted the ~1.2 ms the host is free during a
heavy-load inference step. This script times it with the device drained before each start, so
that only the host's part counts, over many starts of each cut of one job: LoRA r=16 on q and v,
batches of 4 x 128 tokens (the co-location benchmark's job at a shorter length) on a random
model with TinyLlama's 22 layers (which set how many micro-steps a plan has: up to 181) and tiny
widths. Each timed start is followed by its whole step, as in a run.

Each code tree is measured in a child process of its own (``--tree DIR``: that tree's
``harli_jax`` comes first on the path), so the current code and an older worktree can be timed
with the same script; their rounds alternate, so that a change in the machine's load lands on
both. Each child measures every cut, and the samples of a tree's rounds are pooled.

    git worktree add /tmp/old <commit>
    python3 bench/plan_host_time.py --before /tmp/old  # bench/results/plan-host-time-cpu.json

(``--after DIR`` times another worktree instead of this checkout, e.g. a commit without the
checkout's uncommitted changes.)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS, ROWS, SEQ_LEN = 22, 4, 128


def measure(starts: int, warm: int, jax_cache: Path) -> dict:
    """Seconds of each timed start of every cut of the job (run in a child, after its tree has
    been put first on the path); programs compiled before are loaded from ``jax_cache``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import harli_jax

    try:
        from bench.colocate_setup import IdTokenizer, write_data
    except ImportError:  # a tree from before session 17 keeps them in bench.colocate
        from bench.colocate import IdTokenizer, write_data
    from harli_jax.cli_common import enable_compile_cache
    from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob, granularities
    from harli_jax.lora import LoraConfig
    from harli_jax.memory.arena import Arena
    from harli_jax.memory.kv_cache import KVCache
    from harli_jax.models.config import ModelConfig
    from harli_jax.models.llama import Llama

    enable_compile_cache(jax_cache)
    config = ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=LAYERS, num_heads=4,
        num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="harli-plan-host-time-"))
    job_config = FineTuneConfig(
        data=write_data(work / "data.jsonl", config.vocab_size, SEQ_LEN),
        out_dir=work / "job",
        lora=LoraConfig(r=16, alpha=32, target_modules=("q_proj", "v_proj")),
        steps=1_000_000,
        batch_size=ROWS,
        seq_len=SEQ_LEN,
        checkpoint_every=1_000_000,
    )
    model = Llama(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    job = FineTuneJob("job", job_config, model, IdTokenizer())
    # Room to keep every cut's residuals, as the H100's arena does (memory fraction 0.5).
    arena = Arena(KVCache.zeros(LAYERS, 256, 16, 2, 16, jnp.float32))
    job.use_arena(arena)

    def drain() -> None:
        jax.block_until_ready((arena.buffer, job.trainer.done))

    def run_step(cut) -> float:
        """Starts a step cut as ``cut`` and runs it; returns the start's host seconds."""
        drain()
        start = time.perf_counter()
        micro = job.next_micro_step(cut)
        seconds = time.perf_counter() - start
        while micro is not None:
            job.start(micro)
            if micro.kind == "update":
                job.finish_step()
                break
            micro = job.next_micro_step(cut)
        drain()
        return seconds

    cuts = {}
    for cut in granularities(LAYERS, ROWS):
        for _ in range(warm):  # compiles, then leases and plans in the new cut's shape
            run_step(cut)
        samples = [run_step(cut) for _ in range(starts)]
        micro_steps = cut[0] * (2 * len(cut[1]) + 1) + 1
        name = f"{cut[0]} chunks x {len(cut[1])} spans"
        cuts[name] = dict(micro_steps=micro_steps, samples_s=samples)
    return dict(harli_jax=harli_jax.__file__, cuts=cuts)


def run_tree(tree: Path, args: argparse.Namespace) -> dict:
    """`measure` in a child process whose path starts at ``tree``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tree)}
    command = [sys.executable, __file__, "--tree", str(tree), "--starts", str(args.starts)]
    command += ["--warm", str(args.warm), "--jax-cache", str(args.jax_cache)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.splitlines()[-1])
    if not result["harli_jax"].startswith(str(tree.resolve())):
        raise RuntimeError(f"{tree}: the child imported {result['harli_jax']}")
    return result


def commit(tree: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def summary(samples: list[float]) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(samples) * 1e3
    return dict(median_ms=float(np.median(ms)), p90_ms=float(np.quantile(ms, 0.9)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="a worktree of the code to compare against")
    parser.add_argument("--after", type=Path, default=ROOT, help="the code to time (default: here)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per tree")
    parser.add_argument("--starts", type=int, default=40, help="timed starts per cut per round")
    parser.add_argument("--warm", type=int, default=2, help="untimed steps per cut first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/plan-host-time-cpu.json")
    parser.add_argument("--jax-cache", type=Path, default=Path("/tmp/harli-bench-jax-cache"))
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)  # a child's tree
    args = parser.parse_args()
    if args.tree is not None:
        sys.path.insert(0, str(args.tree))
        print(json.dumps(measure(args.starts, args.warm, args.jax_cache)))
        return

    trees = {"before": args.before, "after": args.after}
    trees = {name: tree.resolve() for name, tree in trees.items() if tree is not None}
    pooled: dict[str, dict[str, dict]] = {name: {} for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            print(f"round {round_ + 1}: {name} ({tree})", file=sys.stderr, flush=True)
            for cut, row in run_tree(tree, args)["cuts"].items():
                pooled[name].setdefault(cut, dict(row, samples_s=[]))
                pooled[name][cut]["samples_s"] += row["samples_s"]
    cuts = {}
    for cut, row in pooled["after"].items():
        cuts[cut] = dict(micro_steps=row["micro_steps"], after=summary(row["samples_s"]))
        if "before" in pooled:
            cuts[cut]["before"] = before = summary(pooled["before"][cut]["samples_s"])
            cuts[cut]["ratio"] = before["median_ms"] / cuts[cut]["after"]["median_ms"]
        print(cut, json.dumps(cuts[cut]))
    result = dict(
        command="python3 " + shlex.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        device=f"cpu, {os.cpu_count()} cores",
        commits={name: commit(tree) for name, tree in trees.items()},
        starts_per_cut={name: args.rounds * args.starts for name in trees},
        cuts=cuts,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
