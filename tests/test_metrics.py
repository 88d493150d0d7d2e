"""`EngineMetrics`: what a TPOT SLO's attainment and the latency percentiles count."""

from __future__ import annotations

import numpy as np
import pytest

import harli_jax.engine.metrics as metrics_module
from harli_jax.engine.metrics import EngineMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def decode(metrics: EngineMetrics, clock: Clock, gaps_s: list[float]) -> None:
    """One request whose tokens come ``gaps_s`` apart (its first token at time 0)."""
    metrics.on_submit("r")
    metrics.on_tokens("r", 1, finished=False)
    for gap in gaps_s:
        clock.now += gap
        metrics.on_tokens("r", 1, finished=False)


def test_attainment_counts_every_gap_even_those_no_longer_kept(monkeypatch):
    """Samples fall off the kept series (here after 4); the SLO's share still counts them all:
    3 of 6 gaps within 50 ms, though the 4 kept are all within."""
    monkeypatch.setattr(metrics_module, "_KEEP", 4)
    clock = Clock()
    metrics = EngineMetrics(tpot_slo_s=0.05, clock=clock)
    decode(metrics, clock, [0.08, 0.09, 0.07, 0.01, 0.02, 0.03])
    assert metrics.summary()["slo_attainment"] == pytest.approx(0.5)


def test_recent_percentiles_cover_only_the_last_samples():
    """The live display's percentiles read the last ``recent`` gaps, as numpy does over them."""
    clock = Clock()
    metrics = EngineMetrics(tpot_slo_s=0.05, clock=clock)
    gaps = [0.0015 + 0.001 * i for i in range(100)]  # 49 within 50 ms, none on the boundary
    decode(metrics, clock, gaps)
    recent = metrics.summary(recent=10)
    assert recent["tpot_p50_ms"] == pytest.approx(np.percentile(gaps[-10:], 50) * 1e3)
    assert recent["tpot_p99_ms"] == pytest.approx(np.percentile(gaps[-10:], 99) * 1e3)
    whole = metrics.summary()
    assert whole["tpot_p99_ms"] == pytest.approx(np.percentile(gaps, 99) * 1e3)
    assert recent["slo_attainment"] == whole["slo_attainment"] == pytest.approx(0.49)
