"""A fine-tune job: its data, its LoRA trainer over the shared base weights, its checkpoints, and
its adapter when done; advanced a whole step or one micro-step at a time.

A job never loses an accepted step: a step counts once its optimiser update has run; a checkpoint
(adapter, optimiser state, step, data position) is written every ``checkpoint_every`` steps and at
the end, atomically; a job built over an existing output directory resumes from its last
checkpoint. Checkpoints and a finished job's adapter and record are written by threads of their
own, off the engine loop (`saved` resolves once the last are on disk). A step cut short
(:meth:`FineTuneJob.abandon`, when the scheduler needs the device or memory back) is dropped
whole and its batch is trained again later, never half-applied.

Co-located (:meth:`FineTuneJob.use_arena`), a step keeps its activations and gradient sums in
arena pages; :meth:`FineTuneJob.yield_memory` abandons the open step and frees them at once (the
adapter, optimiser state and data position live outside the arena, so nothing else is lost), and
the next step leases them again, or waits while they cannot be had.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future
from pathlib import Path

import jax
from flax import nnx

from harli_jax.lora.checkpoint import JobCheckpointer, in_thread
from harli_jax.lora.config import LoraConfig
from harli_jax.lora.data import PackedBatches, load_jsonl
from harli_jax.lora.inject import adapter_weights, inject_lora
from harli_jax.lora.optim import make_optimizer
from harli_jax.lora.peft_io import AdapterWeights, save_adapter
from harli_jax.lora.train import MicroStep, Trainer, TrainPlan
from harli_jax.memory.arena import Arena
from harli_jax.memory.page_table import Owner
from harli_jax.memory.sizing import device_memory, temp_bytes
from harli_jax.sched.costs import Cost, compiled_cost, train_cost

Granularity = tuple[int, list[tuple[int, int]]]  # (token chunks, layer spans)


@dataclasses.dataclass(frozen=True)
class FineTuneConfig:
    data: Path
    out_dir: Path
    lora: LoraConfig = LoraConfig()
    steps: int = 100
    lr: float = 2e-4
    warmup_steps: int = 10
    batch_size: int = 4
    seq_len: int = 256
    checkpoint_every: int = 50
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def granularities(num_layers: int, rows: int) -> list[Granularity]:
    """Ways to cut one train step, coarsest first: whole, then layer spans halving down to one
    layer, then the rows split in halves down to one row per chunk (with one-layer spans)."""
    options: list[Granularity] = []
    span = num_layers
    while True:
        options.append((1, [(a, min(a + span, num_layers)) for a in range(0, num_layers, span)]))
        if span == 1:
            break
        span = max(1, span // 2)
    chunks = 2
    while chunks <= rows and rows % chunks == 0:
        options.append((chunks, options[-1][1]))
        chunks *= 2
    return options


class FineTuneJob:
    """One LoRA fine-tune over ``base`` (whose weights it shares, never copies)."""

    def __init__(self, name: str, config: FineTuneConfig, base: nnx.Module, tokenizer):
        if tokenizer is None:
            raise ValueError("fine-tuning needs a checkpoint with tokenizer.json")
        self.name = name
        self.config = config
        examples = load_jsonl(config.data)  # a bad file stops the job before it starts
        self._model_config = base.config
        self._dtype_bytes = base.embed_tokens[...].dtype.itemsize
        model = nnx.merge(*nnx.split(base))  # a new module tree over the same arrays
        inject_lora(model, config.lora, slots=1, rngs=nnx.Rngs(config.seed))
        optimizer = make_optimizer(
            config.lr,
            config.steps,
            config.warmup_steps,
            config.weight_decay,
            config.max_grad_norm,
        )
        self.trainer = Trainer(model, optimizer, seed=config.seed)
        self._batching = dict(batch_size=config.batch_size, seq_len=config.seq_len)
        self._examples, self._tokenizer = examples, tokenizer
        self.batches = PackedBatches(examples, tokenizer, seed=config.seed, **self._batching)
        self.checkpointer = JobCheckpointer(Path(config.out_dir) / "checkpoints")
        self.losses: list[float] = []
        # The finished adapter (host copies), and when it, the record and the final checkpoint
        # are on disk; None until `finalize`.
        self.final_adapter: AdapterWeights | None = None
        self.saved: Future[Path] | None = None
        self.tokens_trained = 0
        self._plan: TrainPlan | None = None
        self._data_before_plan: dict | None = None  # the data state the open step's batch left
        self._batch: dict | None = None  # the open step's batch
        self._replay: tuple[dict, dict] | None = None  # an abandoned step's (data state, batch)
        self.arena: Arena | None = None
        self.yields = 0  # times memory pressure took the job's pages
        self._whole_step_fits: bool | None = None
        if self.checkpointer.latest_step() is not None:
            self._restore()

    # -- state --------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps

    @property
    def adapter_dir(self) -> Path:
        return Path(self.config.out_dir) / "adapter"

    def _state(self) -> dict:
        return {
            "lora": self.trainer.lora,
            "opt_state": self.trainer.opt_state,
            "step": self.step,
            "data": self._replay[0] if self._replay else self.batches.state(),
            "progress": {"tokens_trained": self.tokens_trained, "losses": self.losses},
        }

    def _restore(self) -> None:
        state = self.checkpointer.restore(like=self._state())
        self.trainer.lora, self.trainer.opt_state = state["lora"], state["opt_state"]
        self.trainer.step = state["step"]
        self.batches = PackedBatches.from_state(
            state["data"], self._examples, self._tokenizer, **self._batching
        )
        self.tokens_trained = state["progress"]["tokens_trained"]
        self.losses = list(state["progress"]["losses"])

    def program_cost(self, key: tuple) -> Cost:
        """Stage-1 cost of the trainer's compiled program ``key`` (XLA's, else analytic)."""
        fallback = train_cost(self._model_config, key, self._dtype_bytes)
        return compiled_cost(self.trainer.executable(key), fallback)

    def checkpoint(self) -> None:
        self.checkpointer.save(self.step, self._state())

    @property
    def checkpoint_writing(self) -> bool:
        """Whether a checkpoint is still being written (in the background)."""
        return self.checkpointer.writing()

    def finalize(self) -> None:
        """Hands a finished job's files to a writer thread: the adapter (`final_adapter`, taken
        to the host here), its record ``job.json``, after the final checkpoint is on disk.
        `saved` resolves once all three are. Written on the engine loop's thread, they held
        serving for ~180 ms at the end of the main job on a 2-core CPU."""
        self.final_adapter = adapter_weights(self.trainer.model)
        record = {
            "name": self.name,
            "steps": self.step,
            "tokens_trained": self.tokens_trained,
            "final_loss": self.losses[-1] if self.losses else None,
        }
        self.saved = in_thread(self._write_final, record)

    def wait_saved(self) -> Path:
        """The adapter's directory once a finished job's files are on disk (written now where
        this process did not finish the job: it resumed after its last step)."""
        if self.saved is None:
            self.finalize()
        return self.saved.result()

    def _write_final(self, record: dict) -> Path:
        # After the final checkpoint's write, not beside it: one writer at a time takes the GIL
        # from the engine loop. A finished job's record implies its final checkpoint.
        self.checkpointer.wait()
        save_adapter(self.adapter_dir, self.final_adapter, self.config.lora)
        record["finished_at"] = time.time()
        (Path(self.config.out_dir) / "job.json").write_text(json.dumps(record, indent=2))
        return self.adapter_dir

    # -- whole steps ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One whole step as one program (plain fine-tuning); returns its metrics."""
        metrics = self.trainer.train_step(self._next_batch())
        return self._finish_step(metrics)

    def whole_step_fits(self) -> bool:
        """Whether `train_step`'s one program fits in the device memory left free (XLA's memory
        analysis of it against the allocator's free bytes; always, on a backend that does not
        report its memory). Co-located, an idle loop prefers it to the whole cut in arena pages,
        whose activations make round trips through pages: 41 against 63 ms on the H100 for the
        colocate benchmark's step. Compiles the program ahead of its first run, on every backend:
        compiled there, on the engine loop, it held a co-located run's first requests for 1.7 s
        on a 2-core CPU."""
        if self._whole_step_fits is None:
            rows, seq_len = self.config.batch_size, self.config.seq_len
            executable = self.trainer.step_executable(rows, seq_len)
            memory = device_memory()
            free = None if memory is None else memory[0] - memory[1]
            self._whole_step_fits = free is None or temp_bytes(executable) <= free
        return self._whole_step_fits

    def _finish_step(self, metrics: dict) -> dict:
        loss = float(metrics["loss"])
        self.losses.append(loss)
        self.tokens_trained += int(metrics["tokens"])
        checkpointed = self.step % self.config.checkpoint_every == 0 or self.done
        if checkpointed:
            self.checkpoint()
        if self.done:
            self.trainer.release()
            self.finalize()
        return {
            "loss": loss,
            "tokens": int(metrics["tokens"]),
            "step": self.step,
            "checkpointed": checkpointed,
        }

    # -- micro-steps ------------------------------------------------------------------------
    def use_arena(self, arena: Arena) -> None:
        """Keeps the state of each step in pages of ``arena`` (from the next step on)."""
        if arena is not self.arena:
            self.abandon()
            owner = Owner("finetune", self.name)
            self.trainer.use_arena(arena, owner)
            arena.on_yield(owner, self.yield_memory)
            self.arena = arena

    @property
    def holds_pages(self) -> bool:
        return self.trainer.holds_pages

    def yield_memory(self) -> None:
        """Gives the arena pages back now, abandoning the open step (its batch comes again)."""
        if self.holds_pages:
            self.yields += 1
        self.abandon()
        self.trainer.release()

    def next_micro_step(self, granularity: Granularity) -> MicroStep | None:
        """The next piece of work; starts a new step, cut as ``granularity``, if none is open.
        None when a new step cannot get its arena pages now."""
        if self._plan is None:
            rows, seq_len = self.config.batch_size, self.config.seq_len
            if not self.trainer.reserve(rows, seq_len, *granularity):
                return None
            self._plan = self.trainer.plan(self._next_batch(), *granularity)
        return self.open_micro_step()

    def _next_batch(self) -> dict:
        """The next step's batch: an abandoned step's again, else the data's next."""
        if self._replay is not None:
            (self._data_before_plan, self._batch), self._replay = self._replay, None
        else:
            self._data_before_plan, self._batch = self.batches.state(), next(self.batches)
        return self._batch

    @property
    def in_step(self) -> bool:
        return self._plan is not None

    def open_micro_step(self) -> MicroStep:
        """The open step's next micro-step (its plan fixed the cut); only while ``in_step``."""
        plan = self._open_plan()
        return plan.steps[plan._next]

    def fused_micro_step(self, count: int) -> MicroStep | None:
        """The open step's next ``count`` micro-steps as one program, where they can be
        (adjacent middle spans' forwards or backwards in arena pages); else None."""
        return self.trainer.fused(self._open_plan(), count)

    def _open_plan(self) -> TrainPlan:
        if self._plan is None:
            raise RuntimeError(f"job {self.name!r} has no open step")
        return self._plan

    def run(self, micro: MicroStep) -> tuple[float, dict | None]:
        """Runs ``micro`` to completion. Returns the seconds its program took (the step's
        bookkeeping and checkpoint writes are not in it) and the step's metrics if it completed
        a step."""
        start = time.perf_counter()
        jax.block_until_ready(self.start(micro))
        seconds = time.perf_counter() - start
        return seconds, self.finish_step() if micro.kind == "update" else None

    def start(self, micro: MicroStep) -> jax.Array:
        """Dispatches ``micro``'s program without waiting for it; returns an array that is ready
        once it has run. After an update, `finish_step` must follow before the next micro-step."""
        micro.run()
        return self.trainer.done

    def finish_step(self) -> dict:
        """Completes the step whose update has run; returns its metrics."""
        metrics, self._plan = self._plan.metrics, None
        return self._finish_step(metrics)

    def abandon(self) -> None:
        """Drops the open step; its batch is the next step's (kept, not re-read: rebuilding the
        data iterator took 30-70 ms on the H100's host, a TPOT miss each time). The trainer
        clears its sums on replan."""
        if self._plan is not None:
            self._replay, self._plan = (self._data_before_plan, self._batch), None
