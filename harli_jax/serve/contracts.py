"""What the server's routes code against: the engine (`ServingEngine`, `ServedCore`,
`EngineSnapshot`) and the fine-tuning job manager (`JobService`, `JobInfo`, `JobEvent`), as
:class:`typing.Protocol` s; any object with those attributes fits (`harli_jax.engine.loop.Engine`
and `harli_jax.engine.jobs.JobManager` are the real ones, the tests bring fakes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, Protocol

from harli_jax.engine.loop import RequestStream
from harli_jax.engine.sampling import SamplingParams


class ServedCore(Protocol):
    """The parts of `EngineCore` the server reads."""

    tokenizer: Any  # models.tokenizer.Tokenizer, or None for a checkpoint driven by ids alone
    max_model_len: int

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None: ...


class EngineSnapshot(Protocol):
    """The engine-side numbers `/metrics` exports, read once per scrape."""

    num_running: int
    num_waiting: int
    queue_wait_seconds: Sequence[float]  # arrival -> first scheduled, of admissions since the last
    finetune_tokens: int  # cumulative
    arena_pages: Mapping[str, int]  # pages by owner: "kv", "finetune", "free", "reserved"
    predictor_errors: Mapping[str, Mapping[str, float]]  # family -> Predictor.error_stats()


class ServingEngine(Protocol):
    """What the app needs from `harli_jax.engine.loop.Engine`."""

    core: ServedCore
    max_queued: int  # the most requests in flight; more get 429

    def submit(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream: ...

    def adapters(self) -> list[str]:
        """Names of the adapters requests may name in `SamplingParams.adapter`."""

    def delete_adapter(self, name: str) -> Future[None]:
        """Stops serving adapter ``name``; resolves once requests for it are refused."""

    def metrics_snapshot(self) -> EngineSnapshot: ...


JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class JobInfo(Protocol):
    id: str
    status: JobStatus
    created_at: int  # unix seconds
    finished_at: int | None
    model: str
    fine_tuned_model: str | None  # "ft:<base>:<job id>" once succeeded and served
    training_file: Path
    trained_tokens: int | None
    hyperparameters: dict[str, Any]  # resolved: n_epochs, learning_rate_multiplier, batch_size,
    # lora_r, lora_alpha, lora_target_modules (and seed)
    error: str | None


class JobEvent(Protocol):
    id: str
    created_at: int
    level: str  # "info" | "warn" | "error"
    message: str


class JobService(Protocol):
    """The fine-tuning job manager (harli_jax.engine.jobs) as the routes use it."""

    def create(
        self, training_file: Path, model: str, hyperparameters: dict[str, Any], suffix: str | None
    ) -> JobInfo:
        """Queues a job; ValueError for hyperparameters it cannot run."""

    def get(self, job_id: str) -> JobInfo:
        """KeyError if unknown."""

    def list(self) -> list[JobInfo]:
        """Every job, oldest first."""

    def cancel(self, job_id: str) -> JobInfo:
        """KeyError if unknown; ValueError if the job has already finished."""

    def events(self, job_id: str) -> list[JobEvent]:
        """Oldest first; KeyError if unknown."""

    def delete_model(self, model_id: str) -> bool:
        """Stops serving a job's fine-tuned model for good; False if no job's model it is."""
