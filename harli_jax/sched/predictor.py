"""Harli's two-stage latency predictor for compiled XLA programs: `Predictor`, and its saved file.

Stage 1 (`harli_jax.sched.roofline`) prices a program from XLA's own cost model at the device's
measured rates. The roofline ranks programs well but misses launch overheads, imperfect kernels and
the like, so stage 2 (`harli_jax.sched.correction`) corrects it per program family ("decode",
"prefill", "train", ...) with an online regression on measured times, and per program with a
residual factor (``per_key``; on by default). This module owns what ties the two together: the
registry of programs and their families, the scoring of predictions, and the calibration's format.

Every observation but a program's first is scored against the prediction made just before it;
`error_stats` and `quantile_error_s` summarise those scores for metrics and for the scheduler's
SLO margin.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from harli_jax.sched.correction import Family
from harli_jax.sched.roofline import CostAnalysis, DeviceRates, cost_dict, roofline_seconds

# 5: inference steps gained the feature "after_train"; an older file's inference family lacks it.
_FORMAT_VERSION = 5


@dataclass(frozen=True)
class _Program:
    family: str
    flops: float
    bytes_accessed: float
    roofline_s: float


class Predictor:
    """Predicts the run time of registered compiled programs and learns from measured times."""

    def __init__(
        self,
        rates: DeviceRates,
        *,
        window: int = 256,
        history: int = 1024,
        ridge: float = 1e-3,
        prior_factor: float = 1.0,
        per_key: bool = True,
    ):
        """`window` samples feed the stage-2 fit per family; `history` scored observations feed
        the error statistics; `prior_factor` scales the roofline before a family has samples;
        `per_key` adds each program's residual factor to the family's regression."""
        self._rates = rates
        self._window = window
        self._history = history
        self._ridge = ridge
        self._prior_factor = prior_factor
        self._per_key = per_key
        self._programs: dict[str, _Program] = {}
        self._families: dict[str, Family] = {}

    @property
    def rates(self) -> DeviceRates:
        return self._rates

    def __contains__(self, key: str) -> bool:
        """Whether program `key` is registered."""
        return key in self._programs

    def register(self, key: str, family: str, cost: CostAnalysis) -> None:
        """Registers (or re-registers, after a recompile) program `key` with its cost analysis."""
        cost = cost_dict(cost)
        flops = float(cost.get("flops", 0.0))
        bytes_accessed = float(cost.get("bytes accessed", 0.0))
        self._add_program(key, family, flops, bytes_accessed)

    def _add_program(self, key: str, family: str, flops: float, bytes_accessed: float) -> None:
        cost = {"flops": flops, "bytes accessed": bytes_accessed}
        roofline_s = roofline_seconds(cost, self._rates.peak_flops, self._rates.hbm_bytes_per_s)
        if not roofline_s > 0:
            raise ValueError(
                f"cost of {key!r} has neither flops nor bytes ({cost}); XLA reports -1 for programs"
                " it cannot price, so register an analytic cost instead"
            )
        self._programs[key] = _Program(family, flops, bytes_accessed, roofline_s)
        self._families.setdefault(family, Family(self._window, self._history))

    def roofline(self, key: str) -> float:
        """Stage-1 seconds of program `key`."""
        return self._programs[key].roofline_s

    def keys(self) -> list[str]:
        """The registered programs' keys, sorted."""
        return sorted(self._programs)

    def families(self) -> list[str]:
        """The families of the registered programs, sorted."""
        return sorted(self._families)

    def copy(self) -> Predictor:
        """An independent predictor in the same state (what a calibration hands to each run)."""
        return copy.deepcopy(self)

    def clear_errors(self) -> None:
        """Forgets the error record (not the fit), so later statistics cover later runs only."""
        for family in self._families.values():
            family.clear_errors()

    def predict(self, key: str, **features: float) -> float:
        """Predicted seconds of one run of program `key`.

        A family takes the same feature names on every call (e.g. batch=..., context=...).
        """
        program = self._programs[key]
        family = self._families[program.family]
        return self._predict(family, key, family.row(program.roofline_s, features))

    def _predict(self, family: Family, key: str, row: tuple[float, ...]) -> float:
        fit = family.fit(self._prior_factor, self._ridge)
        predicted = fit.base(row)
        if self._per_key and family.has_samples(key):
            # Its own runs price it, however far off the family's line it sits, and never
            # below the fastest of them.
            predicted *= family.key_factor(key, fit)
            return max(predicted, family.fastest_ratio(key) * row[1])
        if fit.weights is None:
            return predicted
        # No run was ever faster, relative to its roofline, than the fastest in the window.
        return max(predicted, fit.floor_ratio * row[1])

    def observe(self, key: str, measured_s: float, **features: float) -> float:
        """Records a measured run of `key`, scores the prediction made just before it (unless
        this is the first run of `key` in the window), and updates stage 2. Returns that
        prediction, so the caller can log both."""
        if not measured_s > 0:
            raise ValueError(f"a measured time must be positive, got {measured_s}")
        program = self._programs[key]
        family = self._families[program.family]
        row = family.row(program.roofline_s, features)
        predicted_s = self._predict(family, key, row)
        family.add(key, row, float(measured_s), predicted_s)
        return predicted_s

    def _relative_errors(self, family: str) -> np.ndarray:
        state = self._families.get(family)
        if state is None or not state.errors:
            return np.zeros(0)
        predicted, measured = np.array(state.errors).T
        return (measured - predicted) / predicted

    def error_stats(self, family: str) -> dict[str, float]:
        """Relative errors (measured - predicted) / predicted over the last `history` observations.

        `mape` is their mean magnitude, `p99_rel_error` their signed 99th percentile (positive
        means slower than predicted, the side that breaks an SLO), `bias` their mean; NaN if n = 0.
        """
        rel = self._relative_errors(family)
        if rel.size == 0:
            return {"n": 0, "mape": math.nan, "p99_rel_error": math.nan, "bias": math.nan}
        return {
            "n": int(rel.size),
            "mape": float(np.mean(np.abs(rel))),
            "p99_rel_error": float(np.quantile(rel, 0.99)),
            "bias": float(np.mean(rel)),
        }

    def quantile_error_s(self, family: str, q: float = 0.99) -> float:
        """Seconds that measured exceeds predicted by in a fraction q of recent observations
        (0 when predictions run late less often than that, and before any observation).

        The scheduler's safety margin: absolute, so that one slow outlier of a short program
        does not inflate, as a ratio would, the margin of every long one."""
        state = self._families.get(family)
        if state is None or not state.errors:
            return 0.0
        return max(0.0, state.late_quantile(q))

    def state(self) -> dict[str, Any]:
        """The whole calibration (rates, programs, stage-2 samples, error record) as plain data."""
        return {
            "version": _FORMAT_VERSION,
            "rates": asdict(self._rates),
            "config": {
                "window": self._window,
                "history": self._history,
                "ridge": self._ridge,
                "prior_factor": self._prior_factor,
                "per_key": self._per_key,
            },
            "programs": {
                key: {"family": p.family, "flops": p.flops, "bytes_accessed": p.bytes_accessed}
                for key, p in self._programs.items()
            },
            "families": {
                name: {
                    "feature_names": None if f.feature_names is None else list(f.feature_names),
                    "samples": [[key, *row, measured] for key, row, measured in f.samples],
                    "program_samples": {
                        key: [[*row, measured] for row, measured in pairs]
                        for key, pairs in f.program_samples.items()
                    },
                    "errors": [list(pair) for pair in f.errors],
                    "fit": f.fit_state(),
                }
                for name, f in self._families.items()
            },
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Predictor:
        """The predictor `state()` describes; it predicts exactly as the original did."""
        version = state.get("version")
        if version != _FORMAT_VERSION:
            raise ValueError(
                f"unsupported predictor format {version!r} (this version writes and reads "
                f"{_FORMAT_VERSION}): run `harli-jax profile` again"
            )
        predictor = cls(DeviceRates(**state["rates"]), **state["config"])
        for key, p in state["programs"].items():
            predictor._add_program(key, p["family"], p["flops"], p["bytes_accessed"])
        for name, saved in state["families"].items():
            family = predictor._families.setdefault(
                name, Family(predictor._window, predictor._history)
            )
            if saved["feature_names"] is not None:
                family.feature_names = tuple(saved["feature_names"])
            for sample in saved["samples"]:
                family.keep(str(sample[0]), tuple(sample[1:-1]), sample[-1])
            programs = saved["program_samples"].items()
            family.restore_program_samples({k: [(p[:-1], p[-1]) for p in v] for k, v in programs})
            for predicted_s, measured_s in saved["errors"]:
                family.score(predicted_s, measured_s)
            if saved["fit"]:  # the fit in use, which may predate some samples
                family.restore_fit(saved["fit"])
        return predictor

    def save(self, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> None:
        """Writes `state()` as JSON, with `meta` (what the calibration was made for) beside it."""
        state = self.state()
        if meta is not None:
            state["meta"] = dict(meta)
        # Write then rename, so a crash never leaves a truncated calibration behind.
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Predictor:
        """Restores a predictor written by `save`; it predicts exactly as the saved one did."""
        return cls.load_with_meta(path)[0]

    @classmethod
    def load_with_meta(cls, path: str | os.PathLike[str]) -> tuple[Predictor, dict[str, Any]]:
        """`load`, and the `meta` saved with it ({} if none)."""
        with open(path) as fh:
            state = json.load(fh)
        try:
            return cls.from_state(state), dict(state.get("meta") or {})
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a predictor calibration ({err})") from None
