"""Fine-tuning as a service: jobs in the shape of OpenAI's API, run co-located by the engine.

Owns each job's record (status, events, hyperparameters) and its directory on disk
(``<state_dir>/<job id>/``: ``record.json``, a copy of its training file, its checkpoints, its
adapter), so jobs survive a restart: a manager opened on the same directory resumes every job
that had not ended, from its last checkpoint, and serves every succeeded job's adapter again.
Everything that touches the device (building the trainer, training, loading the adapter into
serving) happens on the engine's loop thread through :meth:`Engine.call_soon`; the server's
threads only read and write records.

A succeeded job's adapter is served as ``ft:<base>:<job id>`` before the job reads as succeeded,
from memory, once its files are on disk (a writer thread's: a write that fails fails the job).
When every slot of the engine's adapter bank is taken, the job still succeeds (its adapter is on
disk) but is not served, with a warning event: evicting a served adapter could pull it from under
requests already decoding with it. Deleting a job's fine-tuned model stops serving it (requests
already decoding with it finish with it) and is recorded, so that a restart does not serve it
again. A job that breaks fails alone; serving goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from harli_jax.engine.core import EngineCore
from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob
from harli_jax.engine.loop import Engine
from harli_jax.engine.metrics import EngineMetrics
from harli_jax.lora.config import LoraConfig
from harli_jax.lora.data import PackedBatches, load_jsonl
from harli_jax.lora.peft_io import AdapterWeights, load_adapter
from harli_jax.sched.config import SchedulerConfig
from harli_jax.sched.predictor import Predictor
from harli_jax.sched.roofline import measure_device_rates
from harli_jax.sched.scheduler import ColocationScheduler

BASE_LR = 2e-4  # what learning_rate_multiplier multiplies
DEFAULTS: dict[str, Any] = {
    "n_epochs": 3,
    "batch_size": 4,
    "learning_rate_multiplier": 1.0,
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_target_modules": ["q_proj", "v_proj"],
    "seed": 0,
    "seq_len": 256,  # capped at the model's context
}
_ENDED = ("succeeded", "failed", "cancelled")


@dataclasses.dataclass
class JobEvent:
    id: str
    created_at: int
    level: str
    message: str


@dataclasses.dataclass
class JobInfo:
    id: str
    status: str
    created_at: int
    model: str
    training_file: Path
    hyperparameters: dict[str, Any]
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    model_deleted: bool = False  # its fine-tuned model was deleted: a restart does not serve it
    trained_tokens: int | None = None
    error: str | None = None
    events: list[JobEvent] = dataclasses.field(default_factory=list)


class JobManager:
    """Implements the server's ``JobService`` over an :class:`Engine` and its scheduler."""

    def __init__(
        self,
        engine: Engine,
        scheduler: ColocationScheduler,
        base_name: str,
        state_dir: str | os.PathLike[str],
    ):
        """Resumes the jobs recorded in ``state_dir``; start ``engine`` afterwards (or before:
        the work is queued on its loop either way)."""
        self.engine, self.scheduler, self.base_name = engine, scheduler, base_name
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Reentrant: a status check and the change it allows are one critical section.
        self._lock = threading.RLock()
        self._jobs: dict[str, JobInfo] = {}
        self._running: dict[str, FineTuneJob] = {}  # touched on the loop thread only
        scheduler.on_job_done = self._on_done
        scheduler.on_job_failed = lambda job, error: self._fail(self._jobs[job.name], error)
        records = [_load_record(path) for path in self.state_dir.glob("*/record.json")]
        for info in sorted(records, key=lambda info: (info.created_at, info.id)):
            self._jobs[info.id] = info
            if info.status not in _ENDED:
                self._event(info, "info", "Resuming after a restart")
                self._on_loop(info, self._start)
            elif info.status == "succeeded" and not info.model_deleted:
                self._on_loop(info, self._serve)

    @classmethod
    def colocated(
        cls,
        core: EngineCore,
        base_name: str,
        state_dir: str | os.PathLike[str],
        *,
        tpot_slo_s: float = 0.05,
        max_queued: int = 256,
        predictor: Predictor | None = None,
    ) -> JobManager:
        """The whole service over ``core``: an :class:`Engine` (not yet started: ``.engine``)
        whose co-location scheduler runs this manager's jobs in the slack the TPOT SLO leaves."""
        metrics = EngineMetrics(tpot_slo_s=tpot_slo_s)
        scheduler = ColocationScheduler(
            SchedulerConfig(policy="harli", tpot_slo_s=tpot_slo_s),
            predictor or Predictor(measure_device_rates()),
            metrics,
        )
        engine = Engine(core, scheduler, max_queued=max_queued, metrics=metrics)
        return cls(engine, scheduler, base_name, state_dir)

    # -- JobService -------------------------------------------------------------------------
    def create(
        self, training_file: Path, model: str, hyperparameters: dict[str, Any], suffix: str | None
    ) -> JobInfo:
        if model != self.base_name:
            raise ValueError(f"model {model!r} cannot be fine-tuned here; use {self.base_name!r}")
        resolved = self._resolve(Path(training_file), hyperparameters)
        job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
        # The job trains (and resumes after a restart) from its own copy: the upload may be
        # deleted while the job still needs it, as OpenAI's API allows.
        data = self.state_dir / job_id / Path(training_file).name
        data.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(training_file, data)
        info = JobInfo(job_id, "validating_files", int(time.time()), model, data, resolved)
        with self._lock:
            self._jobs[job_id] = info
        self._event(info, "info", "Job created")
        self._on_loop(info, self._start)
        return info

    def get(self, job_id: str) -> JobInfo:
        with self._lock:
            return self._jobs[job_id]

    def list(self) -> list[JobInfo]:
        with self._lock:
            return list(self._jobs.values())  # creation order

    def cancel(self, job_id: str) -> JobInfo:
        with self._lock:
            info = self._jobs[job_id]
            if info.status in _ENDED:
                raise ValueError(f"job {job_id} has already {info.status}")
            self._set(info, status="cancelled", finished_at=int(time.time()))
            self._event(info, "info", "Job cancelled")
        self._on_loop(info, self._drop)
        return info

    def delete_model(self, model_id: str) -> bool:
        """Stops serving the fine-tuned model ``model_id`` and records that it was deleted, so
        that a restart does not serve it again (the job and its adapter files stay); False if
        no job's model is ``model_id``."""
        with self._lock:
            owners = (i for i in self._jobs.values() if i.fine_tuned_model == model_id)
            info = next((i for i in owners if not i.model_deleted), None)
            if info is None:
                return False
            self._set(info, model_deleted=True)
        self.engine.delete_adapter(model_id).result()
        return True

    def events(self, job_id: str) -> list[JobEvent]:
        with self._lock:
            return list(self._jobs[job_id].events)

    # -- the loop thread ----------------------------------------------------------------------
    def _on_loop(self, info: JobInfo, work: Callable[[JobInfo], None]) -> None:
        """Runs ``work(info)`` on the loop thread, failing the job, not the loop, if it raises."""

        def guarded() -> None:
            try:
                work(info)
            except Exception as err:  # a broken job must not take serving down with it
                self._fail(info, err)

        self.engine.call_soon(guarded)

    def _start(self, info: JobInfo) -> None:
        if info.status in _ENDED:
            return
        job = FineTuneJob(
            info.id,
            self._config(info),
            self.engine.core.base_model,
            self.engine.core.tokenizer,
        )
        job.use_arena(self.engine.core.arena)  # its step state shares the KV cache's pages
        if job.step:
            self._event(info, "info", f"Resumed from the checkpoint of step {job.step}")
        self._running[info.id] = job
        if job.done:  # the last step was saved, but the job had not been marked done
            job.finalize()
            self._on_done(job)
        elif self._transition(info, status="queued" if self.scheduler.jobs else "running"):
            self._event(info, "info", f"Validated training file; {job.config.steps} steps")
            self.scheduler.add_job(job)

    def _config(self, info: JobInfo) -> FineTuneConfig:
        hp = info.hyperparameters
        return FineTuneConfig(
            data=info.training_file,
            out_dir=self.state_dir / info.id,
            lora=LoraConfig(
                r=hp["lora_r"],
                alpha=hp["lora_alpha"],
                target_modules=tuple(hp["lora_target_modules"]),
            ),
            steps=hp["steps"],
            lr=BASE_LR * hp["learning_rate_multiplier"],
            batch_size=hp["batch_size"],
            seq_len=hp["seq_len"],
            seed=hp["seed"],
            checkpoint_every=max(1, hp["steps"] // 10),
            warmup_steps=min(10, hp["steps"] // 10),
        )

    def _on_done(self, job: FineTuneJob) -> None:
        info = self._jobs[job.name]
        self._running.pop(job.name, None)
        try:
            if info.status in _ENDED:  # cancelled while its last step ran
                return
            self._set(info, trained_tokens=job.tokens_trained)
            self._event(info, "info", f"Trained {job.step} steps; final loss {job.losses[-1]:.4f}")
            # Served (from memory) and succeeded once its files are on disk, written off this
            # thread: a write that fails fails the job, and nothing unsaved is served.
            adapter = (job.final_adapter, job.config.lora)
            succeed = functools.partial(self._succeed, saved=job.saved, adapter=adapter)
            job.saved.add_done_callback(lambda _: self._on_loop(info, succeed))
        except Exception as err:  # raised inside the scheduler's step, it would stop the loop
            self._fail(info, err)
        finally:
            self._promote()

    def _succeed(
        self, info: JobInfo, saved: Future[Path], adapter: tuple[AdapterWeights, LoraConfig]
    ) -> None:
        if info.status in _ENDED:  # cancelled while its files were written
            return
        saved.result()  # raises what the write raised: the job fails
        self._serve(info, adapter)
        if self._transition(info, status="succeeded", finished_at=int(time.time())):
            served = info.fine_tuned_model or "not served"
            self._event(info, "info", f"Job succeeded: {served}")

    def _serve(
        self, info: JobInfo, adapter: tuple[AdapterWeights, LoraConfig] | None = None
    ) -> None:
        """Serves the job's adapter (``adapter``, else the one saved in its directory), or says
        in a warning event why it cannot."""
        name = f"ft:{self.base_name}:{info.id}"
        try:
            weights, config = adapter or load_adapter(self.state_dir / info.id / "adapter")
            self.engine.core.load_adapter(name, weights, config)
        except (OSError, ValueError) as err:  # e.g. a full adapter bank, or no bank at all
            self._set(info, fine_tuned_model=None)
            self._event(info, "warn", f"The adapter is saved but not served: {err}")
            return
        self._set(info, fine_tuned_model=name)

    def _drop(self, info: JobInfo) -> None:
        job = self._running.pop(info.id, None)
        if job is not None and job in self.scheduler.jobs:
            job.abandon()
            self.scheduler.jobs.remove(job)
        self._promote()

    def _promote(self) -> None:
        """Marks the job the scheduler runs next as running."""
        if self.scheduler.jobs:
            self._transition(self._jobs[self.scheduler.jobs[0].name], status="running")

    def _fail(self, info: JobInfo, err: Exception) -> None:
        self._running.pop(info.id, None)
        if self._transition(info, status="failed", error=str(err), finished_at=int(time.time())):
            self._event(info, "error", f"Job failed: {err}")
        self._promote()

    def _transition(self, info: JobInfo, **changes: Any) -> bool:
        """Applies ``changes`` unless the job has ended (say, cancelled from another thread
        meanwhile); whether it did."""
        with self._lock:
            if info.status in _ENDED:
                return False
            self._set(info, **changes)
            return True

    # -- records ------------------------------------------------------------------------------
    def _resolve(self, training_file: Path, chosen: dict[str, Any]) -> dict[str, Any]:
        """Every hyperparameter, defaults filled in, and the steps ``n_epochs`` takes; raises
        ValueError (naming the problem) for a job that could not run."""
        hp = {**DEFAULTS, **chosen}
        tokenizer = self.engine.core.tokenizer
        if tokenizer is None:
            raise ValueError(f"{self.base_name!r} has no tokenizer.json: it cannot be fine-tuned")
        epochs, batch_size = hp["n_epochs"], hp["batch_size"]
        if not (isinstance(epochs, int) and isinstance(batch_size, int)):
            raise ValueError("n_epochs and batch_size must be integers")
        if batch_size < 1 or epochs < 1 or hp["learning_rate_multiplier"] <= 0:
            raise ValueError("batch_size, n_epochs and learning_rate_multiplier must be positive")
        context = self.engine.core.model_config.max_position_embeddings
        resolved = {
            "n_epochs": epochs,
            "batch_size": batch_size,
            "learning_rate_multiplier": float(hp["learning_rate_multiplier"]),
            "lora_r": int(hp["lora_r"]),
            "lora_alpha": float(hp["lora_alpha"]),
            "lora_target_modules": list(hp["lora_target_modules"]),
            "seed": int(hp["seed"]),
            "seq_len": min(int(hp["seq_len"]), context),
        }
        LoraConfig(  # validates the LoRA shape now, not on the loop thread later
            r=resolved["lora_r"],
            alpha=resolved["lora_alpha"],
            target_modules=tuple(resolved["lora_target_modules"]),
        )
        # Examples are packed several to a row, so an epoch's steps are counted, not divided.
        batches = PackedBatches(
            load_jsonl(training_file),
            tokenizer,
            batch_size=batch_size,
            seq_len=resolved["seq_len"],
            seed=resolved["seed"],
            num_epochs=epochs,
        )
        resolved["steps"] = sum(1 for _ in batches)
        return resolved

    def _set(self, info: JobInfo, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(info, name, value)
            self._save(info)

    def _event(self, info: JobInfo, level: str, message: str) -> None:
        with self._lock:
            info.events.append(
                JobEvent(f"ftevent-{uuid.uuid4().hex[:12]}", int(time.time()), level, message)
            )
            self._save(info)

    def _save(self, info: JobInfo) -> None:
        folder = self.state_dir / info.id
        folder.mkdir(parents=True, exist_ok=True)
        record = dataclasses.asdict(info)
        record["training_file"] = str(info.training_file)
        tmp = folder / "record.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(folder / "record.json")


def _load_record(path: Path) -> JobInfo:
    record = json.loads(path.read_text())
    record["training_file"] = Path(record["training_file"])
    record["events"] = [JobEvent(**e) for e in record["events"]]
    return JobInfo(**record)
