"""Fine-tuning as a service: jobs in the shape of OpenAI's API, run co-located by the engine.

Owns each job's record (status, events, hyperparameters) and its directory on disk
(``<state_dir>/<job id>/``: ``record.json``, the job's checkpoints, its adapter), so jobs survive a
restart: a manager opened on the same directory resumes every job that had not ended, from its
last checkpoint. Everything that touches the device (building the trainer, training, loading the
adapter into serving) happens on the engine's loop thread through :meth:`Engine.call_soon`; the
server's threads only read and write records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob
from harli_jax.engine.loop import Engine
from harli_jax.lora.config import LoraConfig
from harli_jax.lora.data import load_jsonl
from harli_jax.lora.peft_io import load_adapter
from harli_jax.sched.scheduler import ColocationScheduler

BASE_LR = 2e-4  # what learning_rate_multiplier multiplies
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
    trained_tokens: int | None = None
    error: str | None = None
    events: list[JobEvent] = dataclasses.field(default_factory=list)


class JobManager:
    """Implements the server's ``JobService`` over an :class:`Engine` and its scheduler."""

    def __init__(
        self, engine: Engine, scheduler: ColocationScheduler, base_name: str, state_dir: Path
    ):
        self.engine, self.scheduler, self.base_name = engine, scheduler, base_name
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._jobs: dict[str, JobInfo] = {}
        self._running: dict[str, FineTuneJob] = {}
        scheduler.on_job_done = self._on_done
        scheduler.on_job_failed = lambda job, error: self._fail(self._jobs[job.name], error)
        for record in sorted(self.state_dir.glob("*/record.json")):
            info = _load_record(record)
            self._jobs[info.id] = info
            if info.status not in _ENDED:
                self._event(info, "info", "Resuming after a restart")
                self.engine.call_soon(lambda info=info: self._start(info))
            elif info.status == "succeeded":
                self.engine.call_soon(lambda info=info: self._serve(info))

    # -- JobService -------------------------------------------------------------------------
    def create(
        self, training_file: Path, model: str, hyperparameters: dict[str, Any], suffix: str | None
    ) -> JobInfo:
        if model != self.base_name:
            raise ValueError(f"model {model!r} cannot be fine-tuned here; use {self.base_name!r}")
        resolved = self._resolve(Path(training_file), hyperparameters)
        job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
        info = JobInfo(
            job_id, "validating_files", int(time.time()), model, Path(training_file), resolved
        )
        with self._lock:
            self._jobs[job_id] = info
        self._event(info, "info", "Job created")
        self.engine.call_soon(lambda: self._start(info))
        return info

    def get(self, job_id: str) -> JobInfo:
        with self._lock:
            return self._jobs[job_id]

    def list(self) -> list[JobInfo]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda info: info.created_at)

    def cancel(self, job_id: str) -> JobInfo:
        info = self.get(job_id)
        if info.status in _ENDED:
            raise ValueError(f"job {job_id} has already {info.status}")
        self._set(info, status="cancelled", finished_at=int(time.time()))
        self._event(info, "info", "Job cancelled")
        self.engine.call_soon(lambda: self._drop(job_id))
        return info

    def events(self, job_id: str) -> list[JobEvent]:
        return list(self.get(job_id).events)

    # -- the loop thread ----------------------------------------------------------------------
    def _start(self, info: JobInfo) -> None:
        if info.status in _ENDED:
            return
        hp = info.hyperparameters
        config = FineTuneConfig(
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
        try:
            job = FineTuneJob(
                info.id, config, self.engine.core.base_model, self.engine.core.tokenizer
            )
        except ValueError as err:
            self._fail(info, err)
            return
        self._running[info.id] = job
        self._set(info, status="running" if not self.scheduler.jobs else "queued")
        self._event(info, "info", f"Validated training file; {config.steps} steps")
        self.scheduler.add_job(job)

    def _on_done(self, job: FineTuneJob) -> None:
        info = self._jobs[job.name]
        self._running.pop(job.name, None)
        self._set(info, trained_tokens=job.tokens_trained)
        self._event(info, "info", f"Trained {job.step} steps; final loss {job.losses[-1]:.4f}")
        self._serve(info)
        self._set(info, status="succeeded", finished_at=int(time.time()))
        self._event(info, "info", f"Job succeeded: serving {info.fine_tuned_model}")
        for other in self.scheduler.jobs:
            self._set(self._jobs[other.name], status="running")
            break

    def _serve(self, info: JobInfo) -> None:
        name = f"ft:{self.base_name}:{info.id}"
        weights, config = load_adapter(self.state_dir / info.id / "adapter")
        self.engine.core.load_adapter(name, weights, config)
        self._set(info, fine_tuned_model=name)

    def _drop(self, job_id: str) -> None:
        job = self._running.pop(job_id, None)
        if job is not None and job in self.scheduler.jobs:
            job.abandon()
            self.scheduler.jobs.remove(job)

    def _fail(self, info: JobInfo, err: Exception) -> None:
        self._set(info, status="failed", error=str(err), finished_at=int(time.time()))
        self._event(info, "error", f"Job failed: {err}")

    # -- records ------------------------------------------------------------------------------
    def _resolve(self, training_file: Path, hp: dict[str, Any]) -> dict[str, Any]:
        examples = len(load_jsonl(training_file))
        batch_size = int(hp.get("batch_size", 4))
        epochs = float(hp.get("n_epochs", 3))
        multiplier = float(hp.get("learning_rate_multiplier", 1.0))
        if batch_size < 1 or epochs <= 0 or multiplier <= 0:
            raise ValueError("batch_size, n_epochs and learning_rate_multiplier must be positive")
        targets = hp.get("lora_target_modules", ["q_proj", "v_proj"])
        LoraConfig(r=int(hp.get("lora_r", 8)), target_modules=tuple(targets))  # validates
        return {
            "n_epochs": epochs,
            "batch_size": batch_size,
            "learning_rate_multiplier": multiplier,
            "lora_r": int(hp.get("lora_r", 8)),
            "lora_alpha": float(hp.get("lora_alpha", 16)),
            "lora_target_modules": list(targets),
            "seed": int(hp.get("seed", 0)),
            "seq_len": int(hp.get("seq_len", 256)),
            "steps": max(1, math.ceil(epochs * examples / batch_size)),
        }

    def _set(self, info: JobInfo, **changes) -> None:
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
