"""The one loop that owns the device, and the thread-safe doors into it.

Callers on any thread (the HTTP server, the CLI, tests) :meth:`Engine.submit` requests and get a
:class:`RequestStream` of outputs back; the loop thread alone calls into the device: it drains the
inbox, runs one inference step, then lets the :class:`Colocator` (if any) fill the slack before
the next token's deadline with fine-tune work. A full inbox is refused at once (the server's
429), never blocked on; an accepted request always ends in a finished output or an abort.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Protocol

import jax

from harli_jax.engine.core import EngineCore
from harli_jax.engine.metrics import EngineMetrics
from harli_jax.engine.output import RequestOutput
from harli_jax.engine.sampling import SamplingParams
from harli_jax.sched.costs import StepReport


class QueueFull(Exception):
    """The engine has as many requests as it may queue; retry later."""


class Colocator(Protocol):
    """What the loop asks between inference steps (implemented by the co-location scheduler)."""

    def predictor_errors(self) -> dict[str, dict[str, float]]:
        """Latency-predictor error statistics by program family, for metrics."""

    def after_step(self, report: StepReport | None, prefill_tokens: int = 0) -> bool:
        """Runs fine-tune work after the inference step ``report`` describes (None: the loop
        has no inference work); ``prefill_tokens``: the prompt tokens the next step's prefill
        chunk runs (0: none). True if it ran any. It may leave its last programs queued on the
        device."""

    def during_step(self, running: jax.Array, last: bool) -> float | None:
        """Called once an inference step's first program is queued behind the fine-tune programs
        left queued (``running`` is ready once it has run; ``last``: no program of the step
        follows it): waits for those, returning when the host saw the last end (None: none was
        queued); may use the host until ``running`` is ready, and queue work behind it if
        ``last``."""

    def drain(self) -> float | None:
        """Waits for the fine-tune programs left queued; returns when the host saw the last end
        (None: none was queued)."""


_END = object()


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    """The engine-side numbers the server's ``/metrics`` exports."""

    num_running: int
    num_waiting: int
    queue_wait_seconds: list[float]  # arrival -> admission, of admissions since the last snapshot
    finetune_tokens: int
    arena_pages: dict[str, int]
    predictor_errors: dict[str, dict[str, float]]


class RequestStream:
    """The outputs of one request, consumable from a thread or from asyncio."""

    def __init__(self, request_id: str, engine: Engine):
        self.request_id = request_id
        self._engine = engine
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self._lock = threading.Lock()

    def _put(self, item) -> None:
        with self._lock:
            if self._async is not None:
                loop, q = self._async
                loop.call_soon_threadsafe(q.put_nowait, item)
            else:
                self._outputs.put(item)

    def __iter__(self) -> Iterator[RequestOutput]:
        while (item := self._outputs.get()) is not _END:
            yield item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:  # move anything already delivered, then deliver straight to asyncio
            while not self._outputs.empty():
                q.put_nowait(self._outputs.get())
            self._async = (asyncio.get_running_loop(), q)
        while (item := await q.get()) is not _END:
            yield item

    def result(self) -> RequestOutput | None:
        """Blocks until the request ends; its final output (None if it was aborted first)."""
        outputs = list(self)
        return outputs[-1] if outputs else None

    def abort(self) -> None:
        """Frees the request's sequence at once (the loop ends the stream)."""
        self._engine._inbox.put(("abort", self.request_id))


class Engine:
    """Continuous-batching inference on a background thread, optionally co-located."""

    def __init__(
        self,
        core: EngineCore,
        colocator: Colocator | None = None,
        max_queued: int = 256,
        metrics: EngineMetrics | None = None,
    ):
        self.core = core
        self.metrics = metrics or EngineMetrics()
        self.colocator = colocator
        self.max_queued = max_queued
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._pending = 0  # accepted but not finished; guarded by _count_lock
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- any thread -------------------------------------------------------------------------
    def submit(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Queues a request; raises QueueFull when the engine is at capacity, ValueError for a
        request that can never run (it is checked here, on the caller's thread)."""
        self.core.validate(prompt_token_ids, params)
        with self._count_lock:
            if self._pending >= self.max_queued:
                raise QueueFull(f"{self._pending} requests in flight (limit {self.max_queued})")
            self._pending += 1
        request_id = request_id or self.core.new_request_id()
        stream = RequestStream(request_id, self)
        self.metrics.on_submit(request_id)
        self._inbox.put(("request", (stream, prompt_token_ids, params)))
        self._wake.set()
        return stream

    @property
    def num_pending(self) -> int:
        return self._pending

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` on the loop thread before its next step (for work that touches the
        device or the engine's state, e.g. loading an adapter or starting a fine-tune job)."""
        self._inbox.put(("call", fn))
        self._wake.set()

    def delete_adapter(self, name: str) -> Future[None]:
        """Stops serving adapter ``name`` (`EngineCore.delete_adapter`), on the loop thread; the
        future resolves once requests for it are refused, or raises ValueError if it is not
        loaded."""
        deleted: Future[None] = Future()

        def delete() -> None:
            try:
                self.core.delete_adapter(name)
            except ValueError as err:
                deleted.set_exception(err)
            else:
                deleted.set_result(None)

        self.call_soon(delete)
        return deleted

    def adapters(self) -> list[str]:
        """Names of the adapters requests may ask for."""
        bank = self.core.adapters
        return [] if bank is None else bank.names()

    def metrics_snapshot(self) -> EngineSnapshot:
        pages = self.core.pages.snapshot()
        return EngineSnapshot(
            num_running=self.core.num_running,
            num_waiting=self.core.num_waiting,
            queue_wait_seconds=self.core.drain_queue_waits(),
            finetune_tokens=self.metrics.finetune_tokens,
            arena_pages={k: pages[k] for k in ("kv", "finetune", "free", "reserved")},
            predictor_errors={} if self.colocator is None else self.colocator.predictor_errors(),
        )

    def start(self) -> Engine:
        # What exists now (model, programs, tokenizer) lives as long as the engine: frozen out
        # of the cyclic collector, a full collection no longer walks it. One that did took
        # 0.25-0.44 s on a 2-core CPU, and landed on a token's TPOT.
        gc.freeze()
        self._thread = threading.Thread(target=self._run, name="harli-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        gc.unfreeze()  # what the engine held may be garbage now

    # -- the loop thread --------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            kind, payload = self._inbox.get()
            if kind == "call":
                payload()
            elif kind == "request":
                stream, prompt, params = payload
                self._streams[stream.request_id] = stream
                self.core.add_request(prompt, params, stream.request_id)
            elif payload in self._streams:
                self.core.abort(payload)
                self.metrics.on_abort(payload)
                self._finish(payload)

    def _finish(self, request_id: str) -> None:
        self._streams.pop(request_id)._put(_END)
        with self._count_lock:
            self._pending -= 1

    def _run(self) -> None:
        while not self._stop.is_set():
            stepped = self.core.has_unfinished()
            during = None if self.colocator is None else self.colocator.during_step
            if stepped:
                for out in self.core.step(during):
                    self.metrics.on_tokens(out.request_id, len(out.new_token_ids), out.finished)
                    self._streams[out.request_id]._put(out)
                    if out.finished:
                        self._finish(out.request_id)
            # Arrivals join between a step and the fine-tune work after it, so that work is
            # planned knowing every request the next step admits; later ones wait a step.
            self._drain_inbox()
            idle = not self.core.has_unfinished()
            report = self.core.last_report if stepped and not idle else None
            trained = False
            if self.colocator is not None and (idle or report is not None):
                trained = self.colocator.after_step(report, self.core.next_prefill_tokens())
            if idle and not trained:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
        if self.colocator is not None:
            self.colocator.drain()  # the fine-tune programs in flight are recorded
