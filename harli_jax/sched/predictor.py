"""Harli's two-stage latency predictor for compiled XLA programs.

Stage 1 prices a program from XLA's own cost model: the roofline max(flops / peak rate,
bytes / HBM bandwidth), with both rates measured on the device at hand. The roofline ranks programs
well but misses launch overheads, imperfect kernels and the like, so stage 2 corrects it per program
family ("decode", "prefill", "train", ...) with an online ridge regression on measured times:

    measured_s ~ w . [1, roofline_s, *family features (batch, context tokens, ...)]

refitted every 16 samples on a bounded window of recent ones. The fit minimises *relative* error,
so that short programs (a decode step) count as much as long ones (a train span), and the ridge
pulls towards the prior "measured = factor * roofline" so that few or collinear samples (one
bucket seen so far) still give sane weights. Until a family has enough samples to fit, it
predicts factor * roofline, the factor being the median measured/roofline ratio seen so far.

A linear model over one family cannot follow what differs between its programs in ways the
roofline does not price (a decode kernel's per-page latency at batch 1, one bucket's tiling): on
top of the regression each program keeps a multiplicative residual, the median of measured / fit
over its own recent samples, from its first sample on (``per_key``; on by default).

Every observation but a program's first is scored against the prediction made just before it;
`error_stats` and `quantile_error_s` summarise those scores for metrics and for the scheduler's
SLO margin.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CostAnalysis = Mapping[str, float] | Sequence[Mapping[str, float]]
_FORMAT_VERSION = 3


@dataclass(frozen=True)
class DeviceRates:
    """Achievable rates of one device: flop/s of a bf16 matmul, bytes/s of HBM traffic."""

    peak_flops: float
    hbm_bytes_per_s: float


def _cost_dict(cost: CostAnalysis) -> Mapping[str, float]:
    # Some jax versions return cost_analysis() as a one-element list of dicts.
    if isinstance(cost, Mapping):
        return cost
    if len(cost) != 1:
        raise ValueError(f"expected one cost-analysis dict, got {len(cost)}")
    return cost[0]


def roofline_seconds(cost: CostAnalysis, peak_flops: float, hbm_bytes_per_s: float) -> float:
    """Stage 1: the time a program needs at the device's rates, from `compiled.cost_analysis()`.

    XLA's numbers are only as good as its cost model: on GPU a program that is a single library call
    (a bare cuBLAS matmul) reports -1 (unknown), and a while loop (`lax.scan`) has its body counted
    once, not once per trip. Stage 2 absorbs a consistent undercount within a family; where a
    program is priced as unknown, pass an analytic {"flops", "bytes accessed"} dict instead.
    """
    cost = _cost_dict(cost)
    # XLA marks unknown quantities with negative values; they contribute nothing.
    flops = max(0.0, float(cost.get("flops", 0.0)))
    bytes_accessed = max(0.0, float(cost.get("bytes accessed", 0.0)))
    return max(flops / peak_flops, bytes_accessed / hbm_bytes_per_s)


def _best_seconds_per_call(fn: Callable[..., jax.Array], *args: jax.Array) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up outside the timed region
    best, reps = math.inf, 5
    for _ in range(3):
        start = time.perf_counter()
        # Back-to-back dispatch amortises launch latency, which is not what we measure.
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / reps)
    return best


@functools.cache
def measure_device_rates() -> DeviceRates:
    """Measures peak bf16 matmul flop/s and HBM bandwidth of the default device, once a process.

    On an accelerator this allocates a little over 2 GiB transiently: call it before the arena
    claims device memory. The CPU sizes keep it well under a second.
    """
    on_cpu = jax.default_backend() == "cpu"
    # The copy must be far larger than the last-level cache to measure HBM, not cache.
    # On an H100 a 512 MiB copy still measured 7% below this 1 GiB one (launch and tail effects).
    n, copy_elems = (1024, 1 << 22) if on_cpu else (8192, 1 << 28)
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul_s = _best_seconds_per_call(jax.jit(jnp.matmul), a, a)
    x = jnp.zeros((copy_elems,), jnp.float32)
    # An elementwise op is a copy that XLA cannot elide: it reads x once and writes it once.
    copy_s = _best_seconds_per_call(jax.jit(lambda v: v + 1), x)
    return DeviceRates(peak_flops=2 * n**3 / matmul_s, hbm_bytes_per_s=2 * x.nbytes / copy_s)


@dataclass(frozen=True)
class _Program:
    family: str
    flops: float
    bytes_accessed: float
    roofline_s: float


_KEY_WINDOW = 16  # recent samples of one program behind its residual factor
_REFIT_EVERY = 16  # samples between refits of a family's regression, once it has 2x that many


@dataclass(frozen=True)
class _Fit:
    weights: np.ndarray | None  # None while too few samples
    factor: float  # the prior: median measured / roofline
    floor_ratio: float  # the fastest measured / roofline seen

    def base(self, row: tuple[float, ...]) -> float:
        return float(self.bases(np.array([row]))[0])

    def bases(self, rows: np.ndarray) -> np.ndarray:
        """The fit at each of ``rows``: the regression, except where it falls below the fastest
        measured / roofline ratio (a linear fit extrapolated outside its window, even below
        zero: no run was ever that fast), where the prior, factor * roofline, stands in."""
        prior = self.factor * rows[:, 1]
        if self.weights is None:
            return prior
        fitted = rows @ self.weights
        return np.where(fitted >= self.floor_ratio * rows[:, 1], fitted, prior)


class _Family:
    """Stage-2 state of one program family: its samples, its fit and its error record.

    The scheduler predicts between micro-steps of about a millisecond, after every sample: on the
    H100's host a refit of the regression after each one took a third of a one-layer micro-step.
    So the regression is refitted every ``_REFIT_EVERY`` samples (the window in ring arrays: a
    refit is a few vector operations over it), and what changes in between is followed by the
    programs' residual factors, each worked out from its own few samples when it is next
    predicted."""

    def __init__(self, window: int, history: int):
        self.feature_names: tuple[str, ...] | None = None
        self.errors: deque[tuple[float, float]] = deque(maxlen=history)  # (predicted, measured)
        self._late_s: deque[float] = deque(maxlen=history)  # measured - predicted of each
        self._window = window
        self._keys: list[str] = []  # ring slots, beside the rows of _x and the times of _y
        self._x: np.ndarray | None = None  # [window, features]: allocated at the first sample
        self._y = np.zeros(window)
        self._added = 0  # samples ever added: the next one goes to slot _added % window
        self._by_key: dict[str, deque[tuple[tuple[float, ...], float]]] = {}  # in the window
        self._fit: _Fit | None = None
        self._since_fit = 0  # samples added since the fit
        self._fit_size = 0  # samples the fit was made from
        self._key_factors: dict[str, float] = {}  # residual factors under the current fit
        self._late: dict[float, float] = {}  # late_quantile's answers since the last sample

    def row(self, roofline_s: float, features: Mapping[str, float]) -> tuple[float, ...]:
        names = tuple(sorted(features))
        if self.feature_names is None:
            self.feature_names = names
        elif names != self.feature_names:
            raise ValueError(f"features {names} differ from this family's {self.feature_names}")
        return (1.0, roofline_s, *(float(features[name]) for name in names))

    @property
    def samples(self) -> list[tuple[str, tuple[float, ...], float]]:
        """The window's (program key, row, measured seconds), oldest first."""
        return [
            (self._keys[i], tuple(self._x[i].tolist()), float(self._y[i])) for i in self._order()
        ]

    def _order(self) -> np.ndarray:
        """The window's ring slots, oldest first."""
        size = min(self._added, self._window)
        return (np.arange(size) + (self._added - size)) % self._window

    def add(self, key: str, row: tuple[float, ...], measured_s: float, predicted_s: float):
        # A program's first sample calibrates its residual factor; only later ones score a
        # prediction (a whole-step program first priced from one-layer samples would otherwise
        # put its tens of ms of surprise into every later margin of the family).
        if key in self._by_key:
            self.score(predicted_s, measured_s)
        self.keep(key, row, measured_s)

    def score(self, predicted_s: float, measured_s: float) -> None:
        self.errors.append((predicted_s, measured_s))
        self._late_s.append(measured_s - predicted_s)
        self._late = {}

    def clear_errors(self) -> None:
        self.errors.clear()
        self._late_s.clear()
        self._late = {}

    def keep(self, key: str, row: tuple[float, ...], measured_s: float) -> None:
        """Puts a sample in the window without scoring it (what a saved window restores)."""
        if self._x is None:
            self._x = np.zeros((self._window, len(row)))
        slot = self._added % self._window
        if self._added >= self._window:  # the oldest sample leaves the window
            evicted = self._by_key[self._keys[slot]]
            evicted.popleft()
            if not evicted:
                del self._by_key[self._keys[slot]]
            self._keys[slot] = key
        else:
            self._keys.append(key)
        self._x[slot], self._y[slot] = row, measured_s
        self._added += 1
        self._by_key.setdefault(key, deque()).append((row, measured_s))
        self._since_fit += 1
        self._key_factors.pop(key, None)
        self._late = {}

    def late_quantile(self, q: float) -> float:
        """The q-quantile of measured - predicted seconds over the error record (cached: the
        scheduler asks once per program it considers, every iteration)."""
        if q not in self._late:
            self._late[q] = _quantile(np.fromiter(self._late_s, float, len(self._late_s)), q)
        return self._late[q]

    def fit(self, prior_factor: float, ridge: float) -> _Fit:
        """The family's regression: refitted after each sample while it was made from fewer
        than twice ``_REFIT_EVERY``, then after every ``_REFIT_EVERY``."""
        every = _REFIT_EVERY if self._fit_size >= 2 * _REFIT_EVERY else 1
        if self._fit is not None and self._since_fit < every:
            return self._fit
        self._since_fit, self._fit_size, self._key_factors = 0, min(self._added, self._window), {}
        if not self._added:
            self._fit = _Fit(None, prior_factor, 0.0)
            return self._fit
        order = self._order()  # oldest first: a refit does not depend on where the ring starts
        x, y = self._x[order], self._y[order]
        ratios = y / x[:, 1]
        factor = float(np.median(ratios))
        weights = None
        if len(y) >= x.shape[1] + 2:
            weights = _relative_ridge(x, y, prior=factor, ridge=ridge)
        self._fit = _Fit(weights, factor, float(ratios.min()))
        return self._fit

    def fit_state(self) -> dict[str, Any] | None:
        """The fit in use as plain data (None before the first), for ``restore_fit``."""
        if self._fit is None:
            return None
        weights = self._fit.weights
        return {
            "weights": None if weights is None else weights.tolist(),
            "factor": self._fit.factor,
            "floor_ratio": self._fit.floor_ratio,
            "since": self._since_fit,
            "size": self._fit_size,
        }

    def restore_fit(self, state: Mapping[str, Any]) -> None:
        weights = state["weights"]
        weights = None if weights is None else np.array(weights, dtype=float)
        self._fit = _Fit(weights, float(state["factor"]), float(state["floor_ratio"]))
        self._since_fit, self._fit_size, self._key_factors = state["since"], state["size"], {}

    def key_factor(self, key: str, fit: _Fit) -> float:
        """Program ``key``'s residual: the median measured / fit over its recent samples in the
        window (1 for a program without any).

        A compile-free run of a program is the best predictor of its next one: its factor is its
        own recent median, taken in full from the first sample (a whole-step program next to
        one-layer spans can sit 25x off the family's line). statistics.median: numpy's costs
        ~10x more on lists this short."""
        if key not in self._key_factors:
            recent = list(self._by_key.get(key, ()))[-_KEY_WINDOW:]
            ratios = []
            if recent:
                rows, measured = zip(*recent)
                base = fit.bases(np.array(rows))
                ratios = (np.array(measured)[base > 0] / base[base > 0]).tolist()
            self._key_factors[key] = statistics.median(ratios) if ratios else 1.0
        return self._key_factors[key]


def _quantile(values: np.ndarray, q: float) -> float:
    """``np.quantile(values, q)`` (linear interpolation) from one partition: the numpy call
    costs several times more, and the scheduler asks after every sample."""
    index = q * (len(values) - 1)
    low = int(index)
    high = min(low + 1, len(values) - 1)
    ordered = np.partition(values, (low, high))
    return float(ordered[low] + (ordered[high] - ordered[low]) * (index - low))


def _relative_ridge(x: np.ndarray, y: np.ndarray, prior: float, ridge: float) -> np.ndarray:
    """argmin_w sum(((y - x w) / y)^2) + ridge * |D (w - w0)|^2, w0 = prior * roofline.

    D holds the column norms of the relative design, so `ridge` is scale-free: features measured in
    seconds and in tokens are shrunk alike.
    """
    a = x / y[:, None]
    gram, rhs = a.T @ a, a.sum(axis=0)
    scale = np.sqrt(np.diag(gram))
    scale[scale == 0] = 1.0  # a feature that is always zero carries no information
    w0 = np.zeros(x.shape[1])
    w0[1] = prior
    lhs = gram / np.outer(scale, scale) + ridge * np.eye(len(scale))
    v = np.linalg.solve(lhs, rhs / scale + ridge * scale * w0)
    return v / scale


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
        self._families: dict[str, _Family] = {}

    @property
    def rates(self) -> DeviceRates:
        return self._rates

    def __contains__(self, key: str) -> bool:
        """Whether program `key` is registered."""
        return key in self._programs

    def register(self, key: str, family: str, cost: CostAnalysis) -> None:
        """Registers (or re-registers, after a recompile) program `key` with its cost analysis."""
        cost = _cost_dict(cost)
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
        self._families.setdefault(family, _Family(self._window, self._history))

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

    def _predict(self, family: _Family, key: str, row: tuple[float, ...]) -> float:
        fit = family.fit(self._prior_factor, self._ridge)
        predicted = fit.base(row)
        if self._per_key:
            predicted *= family.key_factor(key, fit)
        if fit.weights is None:
            return predicted
        # No run was ever faster, relative to its roofline, than the fastest (a residual below
        # one may take the fit there).
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
        if version not in (1, 2, _FORMAT_VERSION):
            raise ValueError(f"unsupported predictor format {version!r}")
        predictor = cls(DeviceRates(**state["rates"]), **state["config"])
        for key, p in state["programs"].items():
            predictor._add_program(key, p["family"], p["flops"], p["bytes_accessed"])
        for name, saved in state["families"].items():
            family = predictor._families.setdefault(
                name, _Family(predictor._window, predictor._history)
            )
            if saved["feature_names"] is not None:
                family.feature_names = tuple(saved["feature_names"])
            for sample in saved["samples"]:
                if version == 1:  # samples carried no program key
                    sample = ["", *sample]
                family.keep(str(sample[0]), tuple(sample[1:-1]), sample[-1])
            for predicted_s, measured_s in saved["errors"]:
                family.score(predicted_s, measured_s)
            if saved.get("fit"):  # version 3: the fit in use, which may predate some samples
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
