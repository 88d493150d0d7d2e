"""The FastAPI app: an OpenAI-compatible front door to one running `Engine`.

`create_app` wires the routes (completions and chat in `completions`, files and fine-tuning jobs
in `finetuning`, models (listed, retrieved, a fine-tuned one deleted), health and Prometheus
metrics here) around an engine someone else
started, behind one ASGI gate that checks the API key and bounds the request body before any
route runs. The app holds no device state and starts no threads: the engine's loop does the work.
"""

from __future__ import annotations

import hmac
import os
import time

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from harli_jax.serve import completions, errors, finetuning
from harli_jax.serve.contracts import JobService, ServingEngine
from harli_jax.serve.errors import APIError
from harli_jax.serve.files import FileStore
from harli_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from harli_jax.serve.protocol import ModelCard, ModelDeleted, ModelList

MiB = 2**20


def create_app(
    engine: ServingEngine,
    model_name: str,
    *,
    api_key: str | None = None,
    jobs: JobService | None = None,
    files_dir: str | os.PathLike[str] | None = None,
    tpot_slo_ms: float | None = None,
    max_body_bytes: int = 8 * MiB,
    max_upload_bytes: int = 64 * MiB,
) -> FastAPI:
    """The app serving ``engine`` (already started) as ``model_name`` and its adapters.

    With ``api_key``, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
    Fine-tuning routes exist when ``jobs`` is given, with uploads kept in ``files_dir``.
    ``tpot_slo_ms`` is the SLO that ``/metrics`` reports attainment against.
    """
    if (jobs is None) != (files_dir is None):
        raise ValueError("fine-tuning needs both a job service and a files_dir")
    app = FastAPI(
        title="harli-jax",
        description="OpenAI-compatible serving, with LoRA fine-tuning co-located on one device.",
    )
    errors.install(app)
    metrics = ServerMetrics(
        lambda: engine.metrics_snapshot(), None if tpot_slo_ms is None else tpot_slo_ms / 1e3
    )
    app.include_router(completions.router(engine, model_name, metrics))
    if jobs is not None:
        app.include_router(finetuning.router(jobs, FileStore(files_dir), model_name))
    started = int(time.time())

    def cards() -> list[ModelCard]:
        base = ModelCard(id=model_name, created=started, owned_by="harli-jax", root=model_name)
        return [base] + [
            ModelCard(
                id=name, created=started, owned_by="harli-jax", root=model_name, parent=model_name
            )
            for name in engine.adapters()
        ]

    @app.get("/v1/models", response_model=ModelList, responses=errors.ERROR_RESPONSES)
    def list_models() -> ModelList:
        return ModelList(data=cards())

    @app.get(
        "/v1/models/{model_id:path}", response_model=ModelCard, responses=errors.ERROR_RESPONSES
    )
    def get_model(model_id: str) -> ModelCard:
        for card in cards():
            if card.id == model_id:
                return card
        raise APIError(404, f"the model {model_id!r} does not exist", code="model_not_found")

    @app.delete(
        "/v1/models/{model_id:path}", response_model=ModelDeleted, responses=errors.ERROR_RESPONSES
    )
    def delete_model(model_id: str) -> ModelDeleted:
        """Stops serving a fine-tuned model (an adapter); the base model cannot be deleted."""
        if model_id == model_name:
            raise APIError(403, f"the base model {model_id!r} cannot be deleted")
        if model_id not in engine.adapters():
            raise APIError(404, f"the model {model_id!r} does not exist", code="model_not_found")
        if jobs is None or not jobs.delete_model(model_id):
            engine.delete_adapter(model_id).result()
        return ModelDeleted(id=model_id)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", responses={200: {"content": {"text/plain": {}}}})
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(
        _Gate, api_key=api_key, max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes
    )
    return app


class _Gate:
    """Checks the API key, then reads the body up to its limit (413 beyond) and replays it.

    Counting the bytes as they arrive, not trusting Content-Length alone, bounds chunked uploads
    too. After the replayed body, ``receive`` passes through, so routes still see the client's
    disconnect.
    """

    def __init__(
        self, app: ASGIApp, api_key: str | None, max_body_bytes: int, max_upload_bytes: int
    ):
        self.app = app
        self.api_key = None if api_key is None else api_key.encode()
        self.max_body_bytes, self.max_upload_bytes = max_body_bytes, max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] != "/health":
            scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                denied = APIError(
                    401,
                    "a valid API key is needed: Authorization: Bearer <key>",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await denied.response()(scope, receive, send)
        limit = self.max_upload_bytes if scope["path"] == "/v1/files" else self.max_body_bytes
        too_large = APIError(413, f"the body is over {limit} bytes", code="request_too_large")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await too_large.response()(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete
            body += message.get("body", b"")
            if len(body) > limit:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)
