"""Fine-tuning as a service, in the shape of OpenAI's API: ``/v1/files`` and
``/v1/fine_tuning/jobs``.

The routes own the wire format (pagination, OpenAI's job and event objects) and input checks; the
jobs themselves, their scheduling beside inference and their state on disk belong to the
:class:`JobService` (``harli_jax.engine.jobs``). A succeeded job's adapter is then served under
its ``fine_tuned_model`` name by the completion routes, through the engine's adapter list.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import APIRouter, File, Form, Query, UploadFile

from harli_jax.lora.data import DataError
from harli_jax.serve.contracts import JobInfo, JobService
from harli_jax.serve.errors import ERROR_RESPONSES, APIError
from harli_jax.serve.files import FileStore
from harli_jax.serve.protocol import (
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    FineTuningJobRequest,
    JobError,
)

T = TypeVar("T")
Limit = Annotated[int, Query(ge=1, le=100)]


def router(jobs: JobService, files: FileStore, model_name: str) -> APIRouter:
    # Job-service and file-store calls block on disk and locks: those routes are plain `def`,
    # which FastAPI runs on its thread pool rather than on the event loop.
    api = APIRouter(responses=ERROR_RESPONSES)

    @api.post("/v1/files", response_model=FileObject)
    async def upload_file(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> FileObject:
        if purpose != "fine-tune":
            raise APIError(
                400, f"purpose {purpose!r} is not supported; use 'fine-tune'", param="purpose"
            )
        name = Path(file.filename or "upload.jsonl").name
        try:
            return await asyncio.to_thread(files.add, file.file, name)
        except DataError as err:
            raise APIError(400, str(err), code="invalid_file", param="file") from None

    @api.get("/v1/files", response_model=FileList)
    def list_files() -> FileList:
        return FileList(data=files.list())

    @api.get("/v1/files/{file_id}", response_model=FileObject)
    def get_file(file_id: str) -> FileObject:
        return _found(files.get, file_id, "file")

    @api.delete("/v1/files/{file_id}", response_model=FileDeleted)
    def delete_file(file_id: str) -> FileDeleted:
        _found(files.delete, file_id, "file")
        return FileDeleted(id=file_id, deleted=True)

    @api.post("/v1/fine_tuning/jobs", response_model=FineTuningJob)
    def create_job(body: FineTuningJobRequest) -> FineTuningJob:
        if body.model != model_name:
            raise APIError(
                404,
                f"the model {body.model!r} cannot be fine-tuned here; {model_name!r} can",
                code="model_not_found",
                param="model",
            )
        try:
            files.get(body.training_file)
        except KeyError:
            raise APIError(
                400, f"no file {body.training_file!r}", code="file_not_found", param="training_file"
            ) from None
        hyperparameters = body.hyperparameters.chosen() if body.hyperparameters else {}
        if body.seed is not None:
            hyperparameters["seed"] = body.seed
        try:
            info = jobs.create(
                files.path(body.training_file), body.model, hyperparameters, body.suffix
            )
        except ValueError as err:
            raise APIError(400, str(err), param="hyperparameters") from None
        return _job(info)

    @api.get("/v1/fine_tuning/jobs", response_model=FineTuningJobList)
    def list_jobs(after: str | None = None, limit: Limit = 20) -> FineTuningJobList:
        newest_first = [_job(info) for info in reversed(jobs.list())]
        page, has_more = _page(newest_first, after, limit)
        return FineTuningJobList(data=page, has_more=has_more)

    @api.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
    def get_job(job_id: str) -> FineTuningJob:
        return _job(_found(jobs.get, job_id, "fine-tuning job"))

    @api.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=FineTuningJobEventList)
    def list_events(
        job_id: str, after: str | None = None, limit: Limit = 20
    ) -> FineTuningJobEventList:
        events = _found(jobs.events, job_id, "fine-tuning job")
        newest_first = [
            FineTuningJobEvent(id=e.id, created_at=e.created_at, level=e.level, message=e.message)
            for e in reversed(events)
        ]
        page, has_more = _page(newest_first, after, limit)
        return FineTuningJobEventList(data=page, has_more=has_more)

    @api.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
    def cancel_job(job_id: str) -> FineTuningJob:
        try:
            return _job(_found(jobs.cancel, job_id, "fine-tuning job"))
        except ValueError as err:
            raise APIError(400, str(err), code="job_finished") from None

    return api


def _found(lookup, key: str, what: str):
    """``lookup(key)``, with KeyError turned into a 404 naming the missing thing."""
    try:
        return lookup(key)
    except KeyError:
        raise APIError(404, f"no {what} {key!r}", code="not_found") from None


def _page(items: Sequence[T], after: str | None, limit: int) -> tuple[list[T], bool]:
    """OpenAI's cursor pagination: up to ``limit`` items following the one with id ``after``."""
    start = 0
    if after is not None:
        ids = [item.id for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    page = list(items[start : start + limit])
    return page, start + limit < len(items)


def _job(info: JobInfo) -> FineTuningJob:
    return FineTuningJob(
        id=info.id,
        created_at=info.created_at,
        finished_at=info.finished_at,
        model=info.model,
        fine_tuned_model=info.fine_tuned_model,
        status=info.status,
        hyperparameters=dict(info.hyperparameters),
        training_file=Path(info.training_file).stem,
        trained_tokens=info.trained_tokens,
        error=None if info.error is None else JobError(code="job_failed", message=info.error),
        seed=int(info.hyperparameters.get("seed", 0)),
    )
