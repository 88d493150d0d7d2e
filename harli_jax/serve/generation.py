"""The engine requests behind one API call, from submission to the last token or the client leaving.

One API call becomes one engine request per choice (``n`` per prompt). They are submitted all or
none: if the queue fills part-way, those already in are aborted and the call gets 429. Their
outputs are merged into one async stream in arrival order. Whatever ends the call (completion,
the client disconnecting, the response task being cancelled), every choice still running is
aborted, so the engine frees its sequence at once: a watcher task listens for the client's
disconnect for as long as the choices run, so this holds even for a response that never started
streaming.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request

from harli_jax.engine.loop import QueueFull, RequestStream
from harli_jax.engine.output import RequestOutput
from harli_jax.engine.sampling import SamplingParams
from harli_jax.serve.contracts import ServingEngine
from harli_jax.serve.errors import APIError
from harli_jax.serve.metrics import ChoiceClock, ServerMetrics

RETRY_AFTER_S = 1


class Generation:
    """The choices of one API call; index i is the i-th (prompt, params) pair submitted."""

    def __init__(
        self, engine: ServingEngine, request: Request, metrics: ServerMetrics, endpoint: str
    ):
        self._engine, self._request = engine, request
        self._metrics, self._endpoint = metrics, endpoint
        self._streams: list[RequestStream] = []
        self._clocks: list[ChoiceClock] = []
        self.finals: dict[int, RequestOutput] = {}
        self._ended: set[int] = set()  # finished or aborted
        self._watcher: asyncio.Task | None = None

    def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> None:
        """Submits every choice or none; raises APIError 429 (queue full) or 400 (cannot run)."""
        try:
            for prompt, sp in zip(prompts, params):
                clock = ChoiceClock(time.perf_counter())
                self._streams.append(self._engine.submit(prompt, sp))
                self._clocks.append(clock)
        except QueueFull as err:
            self._abort_all()
            self._metrics.on_end(self._endpoint, "rejected", len(prompts))
            raise APIError(
                429,
                f"the server is at capacity ({err}); retry later",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except ValueError as err:
            self._abort_all()
            raise APIError(400, str(err)) from None
        self._watcher = asyncio.create_task(self._abort_on_disconnect())

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) in arrival order, until every choice finished or was aborted."""
        merged: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    merged.put_nowait((index, out))
            finally:
                merged.put_nowait((index, None))

        pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        try:
            for _ in range(len(pumps)):
                while (item := await merged.get())[1] is not None:
                    index, out = item
                    self._metrics.on_token(self._clocks[index])
                    if out.finished:
                        self.finals[index] = out
                        self._ended.add(index)
                        self._metrics.on_end(self._endpoint, out.finish_reason)
                    yield index, out
        finally:
            for task in pumps:
                task.cancel()
            self.close()

    async def run(self) -> dict[int, RequestOutput]:
        """Waits for every choice; the final outputs by index (fewer if the client left)."""
        async for _ in self.outputs():
            pass
        return self.finals

    def close(self) -> None:
        """Aborts what still runs and stops listening for the client; idempotent."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        unfinished = [i for i in range(len(self._streams)) if i not in self._ended]
        for index in unfinished:
            self._streams[index].abort()
        if unfinished:
            self._ended.update(unfinished)
            self._metrics.on_end(self._endpoint, "abort", len(unfinished))

    def _abort_all(self) -> None:
        for stream in self._streams:
            stream.abort()

    async def _abort_on_disconnect(self) -> None:
        # After the body, the server's receive() returns only when the client has gone (or the
        # response is complete, when there is nothing left to abort).
        while (await self._request.receive())["type"] != "http.disconnect":
            pass
        self._watcher = None  # this task; close() must not cancel it
        self.close()
