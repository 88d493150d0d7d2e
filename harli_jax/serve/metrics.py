"""The server's Prometheus metrics: what clients saw, and the engine's own numbers at scrape time.

Latency is measured where the server hands tokens to the client: TTFT from submission to the
first token, TPOT as each gap between consecutive tokens of one choice (the quantity a TPOT SLO
bounds, as in `harli_jax.engine.metrics`), SLO attainment as the share of those gaps within the
SLO. The rest (queue waits, running and waiting sequences, fine-tune tokens, predictor error,
arena pages by owner) comes from the engine's `metrics_snapshot()`, read once per scrape. Each app
has its own registry, so several apps in one process do not collide.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from harli_jax.serve.contracts import EngineSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
_TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
_PREDICTOR_STATS = ("mape", "p99_rel_error", "bias")


@dataclasses.dataclass
class ChoiceClock:
    """Token arrival times of one choice, as the server hands them on."""

    submitted: float
    last: float | None = None


class ServerMetrics:
    def __init__(
        self, snapshot: Callable[[], EngineSnapshot], tpot_slo_s: float | None = None
    ) -> None:
        self._snapshot = snapshot
        self.tpot_slo_s = tpot_slo_s
        self.registry = r = CollectorRegistry()
        self._requests = Counter(
            "harli_requests", "Choices by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self._ttft = Histogram(
            "harli_time_to_first_token_seconds", "TTFT", buckets=_LATENCY_BUCKETS, registry=r
        )
        self._tpot = Histogram(
            "harli_time_per_output_token_seconds",
            "Gap between consecutive tokens of one choice",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self._queue_wait = Histogram(
            "harli_queue_wait_seconds",
            "Arrival to first scheduling, per request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._tpot_within_slo = Counter(
            "harli_tpot_within_slo", "Token gaps within the TPOT SLO", registry=r
        )
        self._attainment = Gauge(
            "harli_slo_attainment", "Share of token gaps within the TPOT SLO", registry=r
        )
        self._gaps = self._within = 0
        self._running = Gauge("harli_num_requests_running", "Sequences decoding", registry=r)
        self._waiting = Gauge("harli_num_requests_waiting", "Sequences waiting", registry=r)
        self._finetune_tokens = Counter(
            "harli_finetune_tokens", "Fine-tune tokens trained (rate(): tokens/s)", registry=r
        )
        self._finetune_seen = 0
        self._predictor_error = Gauge(
            "harli_predictor_relative_error",
            "Relative error of the latency predictor: (measured - predicted) / predicted",
            ["family", "stat"],
            registry=r,
        )
        self._arena_pages = Gauge(
            "harli_arena_pages", "Arena pages by owner", ["owner"], registry=r
        )

    # -- the serving path (event loop) --------------------------------------------------------
    def on_token(self, clock: ChoiceClock, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if clock.last is None:
            self._ttft.observe(now - clock.submitted)
        else:
            gap = now - clock.last
            self._tpot.observe(gap)
            if self.tpot_slo_s is not None:
                self._gaps += 1
                if gap <= self.tpot_slo_s:
                    self._within += 1
                    self._tpot_within_slo.inc()
        clock.last = now

    def on_end(self, endpoint: str, outcome: str, count: int = 1) -> None:
        """``outcome``: a finish reason, "abort" (the client left) or "rejected" (429)."""
        self._requests.labels(endpoint, outcome).inc(count)

    # -- a scrape -----------------------------------------------------------------------------
    def render(self) -> bytes:
        snap = self._snapshot()
        self._running.set(snap.num_running)
        self._waiting.set(snap.num_waiting)
        for wait in snap.queue_wait_seconds:
            self._queue_wait.observe(wait)
        self._finetune_tokens.inc(max(0, snap.finetune_tokens - self._finetune_seen))
        self._finetune_seen = max(self._finetune_seen, snap.finetune_tokens)
        for family, stats in snap.predictor_errors.items():
            for stat in _PREDICTOR_STATS:
                self._predictor_error.labels(family, stat).set(stats.get(stat, math.nan))
        for owner, pages in snap.arena_pages.items():
            self._arena_pages.labels(owner).set(pages)
        self._attainment.set(self._within / self._gaps if self._gaps else math.nan)
        return generate_latest(self.registry)
