"""The plan of one train step: its micro-steps, which the co-location scheduler runs one at a time.

This module owns `MicroStep` and `TrainPlan`, what `Trainer.plan` returns. Both of a trainer's
planners fill them: `harli_jax.lora.train` for a step kept in the trainer's own buffers,
`harli_jax.lora.arena_steps` for one kept in arena pages. A plan runs its micro-steps strictly in
order, and each names its compiled program by a `ProgramKey`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

ProgramKey = tuple


class MicroStep(NamedTuple):
    """One bounded piece of a train step: ``kind`` is "fwd", "bwd", "head" or "update"; ``key``
    names its compiled program (see `Trainer.executable`). A tuple, not a frozen dataclass: a
    plan makes up to ~180 of them, on the host's side of a co-located step start, where a
    frozen dataclass's construction cost several times more."""

    kind: str
    key: ProgramKey
    dispatch: Callable[[], Any]

    def run(self) -> Any:
        """Dispatches the program; returns its outputs, for a caller timing it to block on."""
        return self.dispatch()


class TrainPlan:
    """The micro-steps of one train step, to run in order; `metrics` is set by the last one."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.steps: list[MicroStep] = []
        self.metrics: dict[str, Any] | None = None
        self._next = 0

    def __iter__(self) -> Iterator[MicroStep]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def _add(self, kind: str, key: ProgramKey, run: Callable[[], Any]) -> None:
        index = len(self.steps)

        def checked() -> Any:
            if self._next != index:
                raise RuntimeError(f"micro-step {index} run out of order (next is {self._next})")
            outputs = run()
            self._next += 1
            return outputs

        self.steps.append(MicroStep(kind, key, checked))
