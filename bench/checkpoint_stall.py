"""How long a fine-tune job's checkpoint holds the thread that saves it (the engine loop's,
co-located): Orbax's synchronous save, Orbax's asynchronous one, and `JobCheckpointer`'s (a copy
of the arrays on their device, written by its own thread with Orbax's synchronous save).

The demo job's state (adapter on every linear module, optimiser state, data position) is saved
``--saves`` times each way. Each save is timed until it returns (what the loop waits); after it,
the thread spins on a small jitted program for 0.4 s while any background write goes on, and the
longest gap between two of its iterations is how much that write delays a busy loop. The
baselines run in the same process, first: the first save of a process sets Orbax up.

    python3 bench/checkpoint_stall.py --out bench/results
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: I001  (sets the allocator before jax is imported)
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from harli_jax import LLM
from harli_jax.demo_task import write_dataset
from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob
from harli_jax.lora.checkpoint import JobCheckpointer, _split
from harli_jax.lora.config import LoraConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def worst_gap_ms(seconds: float) -> float:
    """Spins on a small program for ``seconds``; the longest gap between two iterations."""
    program, x = jax.jit(lambda x: x @ x), jnp.ones((256, 256))
    program(x).block_until_ready()
    end, last, worst = time.perf_counter() + seconds, time.perf_counter(), 0.0
    while time.perf_counter() < end:
        program(x).block_until_ready()
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    return worst * 1e3


def orbax_save(manager: ocp.CheckpointManager, step: int, state: dict) -> None:
    """Orbax's own save of ``state``, split as `JobCheckpointer` splits it."""
    arrays, json_items = _split(state)
    items = dict(json=ocp.args.JsonSave(json_items), arrays=ocp.args.StandardSave(arrays))
    manager.save(step, args=ocp.args.Composite(**items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    llm = LLM.demo(max_num_seqs=2, max_model_len=128, page_size=32, prefill_chunk=64)
    config = FineTuneConfig(
        data=write_dataset(work / "task.jsonl"),
        out_dir=work / "job",
        lora=LoraConfig(r=8, target_modules=TARGETS),
        steps=1000,
        batch_size=8,
        seq_len=64,
        checkpoint_every=1000,
    )
    job = FineTuneJob("job", config, llm.model, llm.tokenizer)
    job.train_step()
    rows = []
    for way in ("synchronous", "asynchronous", "JobCheckpointer"):
        if way == "JobCheckpointer":
            checkpointer = JobCheckpointer(work / way)
            save_state, wait = checkpointer.save, checkpointer.wait
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=2, create=True, enable_async_checkpointing=way == "asynchronous"
            )
            manager = ocp.CheckpointManager(work / way, options=options)
            save_state, wait = functools.partial(orbax_save, manager), manager.wait_until_finished
        for save in range(args.saves):
            start = time.perf_counter()
            save_state(save, job._state())
            held_ms = (time.perf_counter() - start) * 1e3
            gap_ms = worst_gap_ms(0.4)
            wait()
            rows.append(dict(save=way, index=save, held_ms=held_ms, worst_loop_gap_after_ms=gap_ms))
    command = shlex.join(["python3", *sys.argv])
    path = args.out / f"checkpoint-stall-{common.device_name()}.json"
    device = f"{common.device_name()} ({os.cpu_count()} host cores)"
    common.write_result(path, rows, command, device=device)


if __name__ == "__main__":
    main()
