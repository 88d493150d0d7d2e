"""Harli's choice of how to cut a train step into micro-steps.

The cut whose micro-steps, packed in order into the fine-tune budgets recent iterations left,
finish a step in the fewest iterations; ties go to the coarser cut, whose larger micro-steps
waste less. A coarse cut whose big micro-steps fit only every other budget, or leave most of
each budget unused, loses to a finer one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from harli_jax.engine.finetune import Granularity


def fewest_iterations(
    options: Sequence[Granularity],
    planned: Callable[[Granularity], list[float] | None],
    budgets: list[float],
) -> Granularity:
    """The first of ``options`` (coarsest first) whose micro-steps, of ``planned(option)``
    seconds each in run order (None: not calibrated, passed over), finish a step in the fewest
    of ``budgets``; the last option where none is known."""
    best, fewest = options[-1], math.inf
    for option in options:
        sizes = planned(option)
        if sizes is None:
            continue
        iterations = iterations_per_step(sizes, budgets)
        if iterations < fewest:
            best, fewest = option, iterations
    return best


def iterations_per_step(sizes: list[float], budgets: list[float]) -> float:
    """Iterations a step of micro-steps ``sizes`` (seconds, in order) takes when each iteration
    runs the next ones while they fit its budget, the budgets being ``budgets`` over and over;
    infinite if some micro-step fits none of them."""
    if not sizes:
        return 0.0
    if max(sizes) > max(budgets):
        return math.inf
    done = iterations = 0
    while done < len(sizes):
        left = budgets[iterations % len(budgets)]
        iterations += 1
        while done < len(sizes) and sizes[done] <= left:
            left -= sizes[done]
            done += 1
    return float(iterations)
