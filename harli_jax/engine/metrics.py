"""What the engine measures about itself: latency per request and token, SLO attainment, and
fine-tune throughput, over time.

The loop thread records; any thread may read a :meth:`EngineMetrics.summary` or the raw samples
(under the lock). TPOT here is the gap between consecutive output tokens of one request, the
quantity a TPOT SLO bounds; "SLO attainment" is the share of those gaps within the SLO, counted
as they come. A summary holds the lock only to copy what it reads, and a live display reads only
the recent samples (``recent``): the loop thread takes the same lock for every token.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque

import numpy as np

_KEEP = 200_000  # samples kept per series; older ones fall off


class EngineMetrics:
    def __init__(self, tpot_slo_s: float | None = None, clock=time.perf_counter):
        self.tpot_slo_s = tpot_slo_s
        self.clock = clock
        self.start = clock()
        self.lock = threading.Lock()
        self._arrival: dict[str, float] = {}
        self._last_token: dict[str, float] = {}
        self.ttft_s: deque[float] = deque(maxlen=_KEEP)
        self.tpot_s: deque[tuple[float, float]] = deque(maxlen=_KEEP)  # (time, gap)
        self.finetune: deque[tuple[float, int]] = deque(maxlen=_KEEP)  # (time, tokens)
        # Co-located programs: (start, family, seconds; None where not known), inference steps
        # and fine-tune micro-steps alike, so an iteration's parts can be told apart afterwards.
        self.programs: deque[tuple[float, str, float | None]] = deque(maxlen=_KEEP)
        self.finetune_tokens = 0
        self.finetune_steps_dropped = 0  # open steps the scheduler abandoned (batch retrained)
        self.output_tokens = 0
        self.requests_finished = 0
        self._gaps_within = self._gaps_seen = 0  # every TPOT sample, kept or not

    def on_submit(self, request_id: str) -> None:
        with self.lock:
            self._arrival[request_id] = self.clock()

    def on_tokens(self, request_id: str, count: int, finished: bool) -> None:
        now = self.clock()
        with self.lock:
            last = self._last_token.get(request_id)
            if last is None:
                self.ttft_s.append(now - self._arrival.get(request_id, now))
            else:
                gap = (now - last) / max(count, 1)
                self.tpot_s.append((now, gap))
                self._gaps_seen += 1
                self._gaps_within += self.tpot_slo_s is not None and gap <= self.tpot_slo_s
            self._last_token[request_id] = now
            self.output_tokens += count
            if finished:
                self._forget(request_id)
                self.requests_finished += 1

    def on_abort(self, request_id: str) -> None:
        with self.lock:
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._arrival.pop(request_id, None)
        self._last_token.pop(request_id, None)

    def on_finetune_tokens(self, tokens: int) -> None:
        with self.lock:
            self.finetune.append((self.clock(), tokens))
            self.finetune_tokens += tokens

    def on_program(self, start: float, family: str, seconds: float | None) -> None:
        with self.lock:
            self.programs.append((start, family, seconds))

    def on_finetune_abandoned(self) -> None:
        with self.lock:
            self.finetune_steps_dropped += 1

    def summary(self, recent: int | None = None) -> dict[str, float]:
        """Totals, SLO attainment over every TPOT sample, and TPOT/TTFT percentiles over the
        kept samples, or the last ``recent`` of each."""
        with self.lock:
            tpot, ttft = _last(self.tpot_s, recent), _last(self.ttft_s, recent)
            elapsed = self.clock() - self.start
            finetune_tokens, output_tokens = self.finetune_tokens, self.output_tokens
            dropped = self.finetune_steps_dropped
            finished = self.requests_finished
            seen, within = self._gaps_seen, self._gaps_within
        gaps = np.array([gap for _, gap in tpot])

        def pct(values: list[float] | np.ndarray, q: float) -> float:
            return float(np.percentile(values, q) * 1e3) if len(values) else float("nan")

        attainment = float("nan")
        if self.tpot_slo_s is not None and seen:
            attainment = within / seen
        return {
            "elapsed_s": elapsed,
            "requests_finished": finished,
            "output_tokens": output_tokens,
            "tpot_p50_ms": pct(gaps, 50),
            "tpot_p99_ms": pct(gaps, 99),
            "ttft_p50_ms": pct(ttft, 50),
            "ttft_p99_ms": pct(ttft, 99),
            "slo_attainment": attainment,
            "finetune_tokens": finetune_tokens,
            "finetune_tok_s": finetune_tokens / elapsed if elapsed > 0 else 0.0,
            "finetune_steps_dropped": dropped,
        }


def _last(samples: deque, count: int | None) -> list:
    """A copy of ``samples``, or of its last ``count``."""
    if count is None or count >= len(samples):
        return list(samples)
    return list(itertools.islice(reversed(samples), count))[::-1]
