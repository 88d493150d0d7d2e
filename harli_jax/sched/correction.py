"""Stage 2 of the latency predictor: one program family's learned correction of the roofline.

A `Family` ("decode", "prefill", "train", ...) owns a bounded window of recent samples, the online
ridge regression fitted to them, each program's residual factor on top of it, and the record of how
far measured times fell from predictions. The regression is

    measured_s ~ w . [1, roofline_s, *family features (batch, context tokens, ...)]

refitted every 16 samples on the window. The fit minimises *relative* error, so that short
programs (a decode step) count as much as long ones (a train span), and the ridge pulls towards the
prior "measured = factor * roofline" so that few or collinear samples (one bucket seen so far)
still give sane weights. Until a family has enough samples to fit, it predicts factor * roofline,
the factor being the median measured/roofline ratio seen so far.

A linear model over one family cannot follow what differs between its programs in ways the
roofline does not price (a decode kernel's per-page latency at batch 1, one bucket's tiling): on
top of the regression each program keeps a multiplicative residual, the median of measured / fit
over its own recent samples, from its first sample on.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_KEY_WINDOW = 16  # recent samples of one program behind its residual factor
_REFIT_EVERY = 16  # samples between refits of a family's regression, once it has 2x that many
_BASES_KEPT = 256  # rows whose fitted base a fit remembers


@dataclass(frozen=True)
class Fit:
    """A family's regression as last fitted, with the prior that stands in where it cannot."""

    weights: np.ndarray | None  # None while too few samples
    factor: float  # the prior: median measured / roofline
    floor_ratio: float  # the fastest measured / roofline seen
    # base()'s answers: the scheduler prices the same few rows (a train program has no
    # features) several times an iteration, and a fit is replaced, never changed.
    _bases: dict[tuple[float, ...], float] = field(default_factory=dict, compare=False, repr=False)

    def base(self, row: tuple[float, ...]) -> float:
        if row not in self._bases:
            if len(self._bases) >= _BASES_KEPT:
                self._bases.clear()
            self._bases[row] = float(self.bases(np.array([row]))[0])
        return self._bases[row]

    def bases(self, rows: np.ndarray) -> np.ndarray:
        """The fit at each of ``rows``: the regression, except where it falls below the fastest
        measured / roofline ratio (a linear fit extrapolated outside its window, even below
        zero: no run was ever that fast), where the prior, factor * roofline, stands in."""
        prior = self.factor * rows[:, 1]
        if self.weights is None:
            return prior
        fitted = rows @ self.weights
        return np.where(fitted >= self.floor_ratio * rows[:, 1], fitted, prior)


class Family:
    """Stage-2 state of one program family: its samples, its fit and its error record.

    The scheduler predicts between micro-steps of about a millisecond, after every sample: on the
    H100's host a refit of the regression after each one took a third of a one-layer micro-step.
    So the regression is refitted every ``_REFIT_EVERY`` samples (the window in ring arrays: a
    refit is a few vector operations over it), and what changes in between is followed by the
    programs' residual factors, each worked out from its own few samples when it is next
    predicted."""

    def __init__(self, window: int, history: int) -> None:
        self.feature_names: tuple[str, ...] | None = None
        self.errors: deque[tuple[float, float]] = deque(maxlen=history)  # (predicted, measured)
        self._late_s: deque[float] = deque(maxlen=history)  # measured - predicted of each
        self._window = window
        self._keys: list[str] = []  # ring slots, beside the rows of _x and the times of _y
        self._x: np.ndarray | None = None  # [window, features]: allocated at the first sample
        self._y = np.zeros(window)
        self._added = 0  # samples ever added: the next one goes to slot _added % window
        # Each program's last _KEY_WINDOW samples, in the window or not.
        self._by_key: dict[str, deque[tuple[tuple[float, ...], float]]] = {}
        self._fit: Fit | None = None
        self._since_fit = 0  # samples added since the fit
        self._fit_size = 0  # samples the fit was made from
        self._key_factors: dict[str, float] = {}  # residual factors under the current fit
        self._key_fastest: dict[str, float] = {}  # fastest_ratio's answers since a key's sample
        self._late: dict[float, float] = {}  # late_quantile's answers since the last sample

    def row(self, roofline_s: float, features: Mapping[str, float]) -> tuple[float, ...]:
        """The regression's row of one run, [1, roofline_s, *features by name]; the family's
        first call fixes the feature names."""
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

    def has_samples(self, key: str) -> bool:
        return key in self._by_key

    @property
    def program_samples(self) -> dict[str, list[tuple[tuple[float, ...], float]]]:
        """Each program's last (row, measured seconds), behind its residual factor."""
        return {key: list(samples) for key, samples in self._by_key.items()}

    def restore_program_samples(
        self, samples: Mapping[str, list[tuple[tuple[float, ...], float]]]
    ) -> None:
        """Sets what ``program_samples`` returned (after the window's samples are kept)."""
        self._by_key = {
            key: deque(((tuple(row), float(y)) for row, y in pairs), maxlen=_KEY_WINDOW)
            for key, pairs in samples.items()
        }
        self._key_factors, self._key_fastest = {}, {}

    def _order(self) -> np.ndarray:
        """The window's ring slots, oldest first."""
        size = min(self._added, self._window)
        return (np.arange(size) + (self._added - size)) % self._window

    def add(self, key: str, row: tuple[float, ...], measured_s: float, predicted_s: float) -> None:
        """Puts a measured run in the window, scored against the prediction made before it."""
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
            self._keys[slot] = key
        else:
            self._keys.append(key)
        self._x[slot], self._y[slot] = row, measured_s
        self._added += 1
        self._by_key.setdefault(key, deque(maxlen=_KEY_WINDOW)).append((row, measured_s))
        self._since_fit += 1
        self._key_factors.pop(key, None)
        self._key_fastest.pop(key, None)
        self._late = {}

    def late_quantile(self, q: float) -> float:
        """The q-quantile of measured - predicted seconds over the error record (cached: the
        scheduler asks once per program it considers, every iteration)."""
        if q not in self._late:
            self._late[q] = _quantile(np.fromiter(self._late_s, float, len(self._late_s)), q)
        return self._late[q]

    def fit(self, prior_factor: float, ridge: float) -> Fit:
        """The family's regression: refitted after each sample while it was made from fewer
        than twice ``_REFIT_EVERY``, then after every ``_REFIT_EVERY``."""
        every = _REFIT_EVERY if self._fit_size >= 2 * _REFIT_EVERY else 1
        if self._fit is not None and self._since_fit < every:
            return self._fit
        self._since_fit, self._fit_size, self._key_factors = 0, min(self._added, self._window), {}
        if not self._added:
            self._fit = Fit(None, prior_factor, 0.0)
            return self._fit
        order = self._order()  # oldest first: a refit does not depend on where the ring starts
        x, y = self._x[order], self._y[order]
        ratios = y / x[:, 1]
        factor = float(np.median(ratios))
        weights = None
        if len(y) >= x.shape[1] + 2:
            weights = _relative_ridge(x, y, prior=factor, ridge=ridge)
        self._fit = Fit(weights, factor, float(ratios.min()))
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
        self._fit = Fit(weights, float(state["factor"]), float(state["floor_ratio"]))
        self._since_fit, self._fit_size, self._key_factors = state["since"], state["size"], {}

    def key_factor(self, key: str, fit: Fit) -> float:
        """Program ``key``'s residual: the median measured / fit over its last ``_KEY_WINDOW``
        samples (1 for a program without any), kept when they leave the family's window: a
        program run rarely (a whole-step cut, chosen once in a while) lost its residual there,
        and the family's line, fitted on short spans, priced a 24 ms program at 5 ms.

        A compile-free run of a program is the best predictor of its next one: its factor is its
        own recent median, taken in full from the first sample (a whole-step program next to
        one-layer spans can sit 25x off the family's line). statistics.median: numpy's costs
        ~10x more on lists this short."""
        if key not in self._key_factors:
            recent = self._by_key.get(key, ())
            ratios = []
            if recent:
                rows, measured = zip(*recent)
                base = fit.bases(np.array(rows))
                ratios = (np.array(measured)[base > 0] / base[base > 0]).tolist()
            self._key_factors[key] = statistics.median(ratios) if ratios else 1.0
        return self._key_factors[key]

    def fastest_ratio(self, key: str) -> float:
        """The lowest measured / roofline among program ``key``'s last ``_KEY_WINDOW`` samples
        (infinite without any): no prediction of ``key`` goes below it. A residual factor taken
        where the family's fit is far off (the program's recent runs all at one feature value,
        say right after fine-tune work) is off by as much at another value."""
        if key not in self._key_fastest:
            recent = self._by_key.get(key, ())
            self._key_fastest[key] = min((y / row[1] for row, y in recent), default=math.inf)
        return self._key_fastest[key]


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
