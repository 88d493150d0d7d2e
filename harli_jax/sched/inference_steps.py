"""What the scheduler learns from the inference steps it sees.

`InferenceSteps` owns the predictor's side of each inference step: registering a program the
first time it runs, deciding whether a step is a latency sample at all (a program's first step
may compile; a step whose host time also started a train step ran long for that), the stage-2
features it is learned with, and the recent steps that ran a prefill chunk, which price the next
such step. Learning itself (the predictor's refits and quantiles) is host time, so it is handed
back as a callable the scheduler runs once the fill's first program is queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from harli_jax.sched.calibration import Calibration, inference_features
from harli_jax.sched.costs import StepReport
from harli_jax.sched.predictor import Predictor


class InferenceSteps:
    """The inference steps seen by one scheduler, and learning from them."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.after_train = False  # whether fine-tune work ran since the last inference step
        self.carried_start = False  # whether the running step's host time started a train step
        # Recent steps that ran a prefill chunk: (seconds, prompt tokens).
        self.prefill_steps: deque[tuple[float, float]] = deque(maxlen=64)
        self._seen: set[str] = set()  # programs that have run once (that run may compile)
        self._pending: Callable[[], None] | None = None  # learning deferred by `defer`

    def note(
        self, report: StepReport, calibration: Calibration | None = None
    ) -> Callable[[], None] | None:
        """Registers ``report``'s program; returns what learning from its time takes (None:
        nothing, e.g. its first run). With ``calibration``, a decode step's time is also kept
        there, for tuning ``static``'s budget."""
        carried_start, self.carried_start = self.carried_start, False
        seen = report.key in self._seen
        self._seen.add(report.key)
        if report.key not in self.predictor:
            self.predictor.register(report.key, "inference", report.cost)
            return None
        if not seen or carried_start:
            return None
        features = inference_features(report, self.after_train)

        def learn() -> None:
            self.predictor.observe(report.key, report.seconds, **features)
            if report.features.get("prefill_tokens"):
                self.prefill_steps.append((report.seconds, report.features["prefill_tokens"]))
            elif calibration is not None:  # static's budget is tuned on decode iterations
                calibration.inference_s.append(report.seconds)

        return learn

    def defer(self, report: StepReport) -> None:
        """Notes ``report`` now and learns from it at the next `learn_pending`."""
        self._pending = self.note(report)

    def learn_pending(self) -> None:
        """Learns from the deferred step, if that is still to do."""
        learn, self._pending = self._pending, None
        if learn is not None:
            learn()
