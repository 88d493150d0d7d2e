"""The plan of one train step: its micro-steps, which the co-location scheduler runs one at a time.

This module owns `MicroStep` and `TrainPlan`, what `Trainer.plan` returns, and the cut of a step
into the pieces its programs see: `spans_of` for its layers, `row_chunks` for its batch's rows.
Both of a trainer's planners fill plans: `harli_jax.lora.train` for a step kept in the trainer's
own buffers, adding each micro-step as it plans, and `harli_jax.lora.arena_steps` for one kept in
arena pages, which builds a cut's micro-steps once (`Unbound`, a skeleton) and binds them to each
step's arguments (`TrainPlan.bind`). A plan runs its micro-steps strictly in order, and each names
its compiled program by a `ProgramKey`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from harli_jax.lora.layout import Span
from harli_jax.lora.programs import FIELDS, Batch

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


class SpanCall(NamedTuple):
    """A span's forward or backward in a skeleton: its program and what it is called with
    beside the arena and the step's own arguments."""

    program: Callable
    span: Span
    fixed: tuple
    chunk: int


class Unbound(NamedTuple):
    """A micro-step before it belongs to a plan: ``run(plan)`` dispatches it with the plan's
    per-step arguments (`TrainPlan.args`). ``call`` is set for a middle span's forward or
    backward: its program and fixed arguments, which a dispatch that runs several adjacent ones
    as one program needs (`harli_jax.lora.arena_steps.ArenaSteps.fused`)."""

    kind: str
    key: ProgramKey
    run: Callable[[TrainPlan], Any]
    call: SpanCall | None = None


class TrainPlan:
    """The micro-steps of one train step, to run in order; `metrics` is set by the last one.
    ``args``: what the micro-steps of a bound skeleton read that changes from step to step."""

    def __init__(self, step: int, args: Any = None) -> None:
        self.step = step
        self.args = args
        self.steps: list[MicroStep] = []
        self.metrics: dict[str, Any] | None = None
        self._next = 0

    @classmethod
    def bind(cls, step: int, skeleton: Sequence[Unbound], args: Any) -> TrainPlan:
        """The plan of step ``step`` that runs ``skeleton``'s micro-steps with ``args``. Binding
        is all the per-step work of a skeleton's plan: a tuple and a partial per micro-step."""
        plan = cls(step, args)
        run = plan._run
        plan.steps = [
            MicroStep(kind, key, functools.partial(run, index, unbound, plan))
            for index, (kind, key, unbound, _) in enumerate(skeleton)
        ]
        return plan

    def __iter__(self) -> Iterator[MicroStep]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def _add(self, kind: str, key: ProgramKey, run: Callable[[], Any]) -> None:
        self.steps.append(MicroStep(kind, key, functools.partial(self._run, len(self.steps), run)))

    def _run(self, index: int, run: Callable[..., Any], *args: Any, count: int = 1) -> Any:
        """Runs micro-step ``index`` (``run(*args)``), which must be the next; ``count``: it
        runs that many of the plan's micro-steps in one program."""
        if self._next != index:
            raise RuntimeError(f"micro-step {index} run out of order (next is {self._next})")
        outputs = run(*args)
        self._next += count
        return outputs


@functools.lru_cache(maxsize=64)
def _layer_spans(layer_spans: tuple[tuple[int, int], ...], num_layers: int) -> tuple[Span, ...]:
    starts = [0, *(b for _, b in layer_spans)]
    if (
        not layer_spans
        or starts[-1] != num_layers
        or any(a != start or a >= b for (a, b), start in zip(layer_spans, starts))
    ):
        raise ValueError(
            f"layer_spans {list(layer_spans)} must be contiguous non-empty (start, stop) pairs "
            f"covering layers 0..{num_layers}"
        )
    spans = []
    for a, b in layer_spans:
        if a == 0:
            spans.append(Span("whole" if b == num_layers else "first", slice(0, b), 0))
        elif b == num_layers:
            spans.append(Span("last", slice(a, b), 0))
        else:
            spans.append(Span("middle", slice(0, b - a), a))
    return tuple(spans)


def spans_of(layer_spans: Sequence[tuple[int, int]], num_layers: int) -> tuple[Span, ...]:
    """The `Span`s of a step's layers cut into ``layer_spans`` (contiguous ``(start, stop)``
    pairs covering all ``num_layers``); made once per cut, as a start asks for them twice."""
    return _layer_spans(tuple(map(tuple, layer_spans)), num_layers)


def row_chunks(batch: Batch, chunks: int, split: Callable = np.split) -> list[dict[str, Any]]:
    """``batch``'s arrays (`FIELDS`) cut into ``chunks`` equal row chunks by ``split``:
    `np.split` on the host, `jnp.split` inside a program."""
    parts = {name: split(batch[name], chunks) for name in FIELDS}
    return [{name: parts[name][i] for name in FIELDS} for i in range(chunks)]
