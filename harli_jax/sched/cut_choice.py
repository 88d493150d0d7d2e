"""Harli's choice of how to cut a train step into micro-steps.

The cut whose micro-steps, packed in order into the fine-tune budgets recent iterations left,
finish a step in the fewest iterations. A coarse cut whose big micro-steps fit only every other
budget, or leave most of each budget unused, loses to a finer one. Ties go to the finer layer
span: its smaller micro-steps leave less of each budget unused, so a fill that runs short of its
estimate backs off less (on the H100 a fixed 1 x 22 cut trained 6-11% more than choices that
tied 1 x 11 with it). Never to a row split on a tie: a split runs the same layers once per chunk,
so it must take strictly fewer iterations to win (on the 2-core CPU, ties to row splits made the
main job's training finish 20% later).

The packing prices micro-steps as a fill does: a fill charges the program in flight and the next
their margins, and the programs before them what they took, so an iteration's margins do not add
up with its micro-steps. Charging every micro-step its margin (as an earlier packing did) priced
a 1 x 22 cut's seven micro-steps a fill ~2 ms over what they took on the H100, and chose coarser
cuts that trained 10% less.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from harli_jax.engine.finetune import Granularity

Planned = tuple[list[float], list[float]]  # a cut's micro-steps: expected seconds, margins


def fewest_iterations(
    options: Sequence[Granularity],
    planned: Callable[[Granularity], Planned | None],
    budgets: list[float],
) -> Granularity:
    """The option of ``options`` (coarsest first) whose micro-steps, ``planned(option)`` (None:
    not calibrated, passed over), finish a step in the fewest of ``budgets``; of those that tie,
    the finest layer span without a row split (the coarsest option where all tying ones split
    rows); :func:`finest_span` where none is known or no budget was seen."""
    best, fewest = finest_span(options), math.inf
    if not budgets:
        return best
    for option in options:
        plan = planned(option)
        if plan is None:
            continue
        iterations = iterations_per_step(*plan, budgets)
        chunks, _ = option
        if iterations < fewest or (iterations == fewest and chunks == 1):
            best, fewest = option, iterations
    return best


def finest_span(options: Sequence[Granularity]) -> Granularity:
    """The finest layer span of ``options`` that does not split the rows: the cut to start with
    before any budget is known. The finest row split fits any budget too, but its micro-steps
    are so small that a step takes ~4x the iterations; on the H100 at light load, the first
    step so cut priced filling below training in idle time, and harli never filled again."""
    return [option for option in options if option[0] == 1][-1]


def iterations_per_step(sizes: list[float], margins: list[float], budgets: list[float]) -> float:
    """Iterations a step of micro-steps of expected ``sizes`` (seconds, in order) and
    ``margins`` takes, the budgets being ``budgets`` over and over: each iteration runs the next
    micro-step while the expected seconds of those it ran, plus its own with its margin and the
    previous one's margin, fit its budget. Infinite if some micro-step fits no budget."""
    if not sizes:
        return 0.0
    if max(size + margin for size, margin in zip(sizes, margins)) > max(budgets):
        return math.inf
    done = iterations = 0
    while done < len(sizes):
        left, in_flight = budgets[iterations % len(budgets)], 0.0
        iterations += 1
        while done < len(sizes) and sizes[done] + margins[done] + in_flight <= left:
            left, in_flight = left - sizes[done], margins[done]
            done += 1
    return float(iterations)
