"""Where each co-located iteration's time went, from a `bench/colocate.py --timelines` result.

An iteration runs from one inference program's start to the next's: the inference program,
then the fine-tune programs dispatched before the next one (its fill), then host time. For each
run this prints, over the iterations that ran fine-tune work: their median length against the
SLO, the inference program's, the fill's programs' (the seconds each was measured at, so a
program the host saw late adds nothing), the rest (host time and device idle), micro-steps per
fill, and fine-tune tokens per millisecond of train programs and per millisecond of iteration.
It also counts each run's late tokens (TPOT over the SLO) by cause (`late_tokens`), and, where
the run logged its predictions, how the predictor erred by program family and, for inference
steps, by what came before them (`prediction_errors`).

    python3 bench/fill_analysis.py RESULT.json [--json OUT] [--strip OUT]

``--strip OUT`` writes the result without its timelines, with these summaries in their place
(timelines of a whole run are too large to commit).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
from pathlib import Path

import numpy as np


def _in_trace(programs: list) -> list:
    """A program timeline's entries from the trace's start on (calibration's come before it),
    in start order."""
    return sorted((p for p in programs if p[0] >= 0), key=lambda p: p[0])


def iterations(programs: list) -> list[dict]:
    """The run's iterations from its program timeline (start, family, seconds), in order; the
    last inference program, with no next to end it, opens none."""
    timed = _in_trace(programs)
    starts = [i for i, (_, name, _) in enumerate(timed) if name == "inference"]
    found = []
    for here, after in zip(starts, starts[1:]):
        start, _, inference_s = timed[here]
        fill = timed[here + 1 : after]
        found.append(
            dict(
                seconds=timed[after][0] - start,
                inference_s=inference_s or 0.0,
                train_s=sum(s or 0.0 for _, _, s in fill),
                micro_steps=len(fill),
                programs=[(name, s) for _, name, s in fill],
            )
        )
    return found


def summarise(run: dict, slo_ms: float) -> dict:
    """A run's filled iterations, in medians (ms) and rates."""
    filled = [i for i in iterations(run["timeline"]["programs"]) if i["micro_steps"]]
    if not filled:
        return dict(policy=run["policy"], load=run["load"], filled_iterations=0)

    def median_ms(key: str) -> float:
        return 1e3 * float(np.median([i[key] for i in filled]))

    rest = [i["seconds"] - i["inference_s"] - i["train_s"] for i in filled]
    tokens = sum(n for t, n in run["timeline"]["finetune"] if t >= 0)
    train_ms = 1e3 * sum(i["train_s"] for i in filled)
    iteration_ms = 1e3 * sum(i["seconds"] for i in filled)
    return dict(
        policy=run["policy"],
        load=run["load"],
        filled_iterations=len(filled),
        iteration_ms=median_ms("seconds"),
        slo_left_ms=slo_ms - median_ms("seconds"),
        inference_ms=median_ms("inference_s"),
        fill_programs_ms=median_ms("train_s"),
        rest_ms=1e3 * float(np.median(rest)),
        micro_steps=float(np.median([i["micro_steps"] for i in filled])),
        tokens_per_train_ms=tokens / train_ms if train_ms else None,
        tokens_per_filled_iteration_ms=tokens / iteration_ms,
        **margin_evidence(filled),
    )


def margin_evidence(filled: list[dict]) -> dict:
    """How a fill's programs' measured seconds stray from their family's median (ms), one by one
    and summed over a fill (fills whose programs were all timed): the 90th percentile of each,
    the sum of the programs' 90th percentiles over a median fill (what margins priced per
    program at that quantile add up to), and the correlation of consecutive programs' strays
    (negative where one program's time takes from the next's: the host saw the first end late,
    and the second starts from then). A fused variant's families mix program sizes, so its
    figures say nothing."""
    fills = [i["programs"] for i in filled if all(s for _, s in i["programs"])]
    by_family = collections.defaultdict(list)
    for name, seconds in (p for fill in fills for p in fill):
        by_family[name].append(seconds)
    median = {name: float(np.median(times)) for name, times in by_family.items()}
    strays = [[1e3 * (s - median[name]) for name, s in fill] for fill in fills]
    pairs = np.array([pair for fill in strays for pair in zip(fill, fill[1:])])
    each = [x for fill in strays for x in fill]
    if len(pairs) < 2:
        return {}
    each_p90 = float(np.percentile(each, 90))
    summed = [sum(fill) for fill in strays]
    return dict(
        program_stray_p90_ms=each_p90,
        fill_stray_p90_ms=float(np.percentile(summed, 90)),
        fill_stray_p99_ms=float(np.percentile(summed, 99)),
        summed_program_p90_ms=each_p90 * float(np.median([len(fill) for fill in strays])),
        consecutive_stray_corr=float(np.corrcoef(pairs.T)[0, 1]),
    )


def prediction_errors(run: dict) -> dict:
    """How the predictor erred over a run (its ``predictions``: each learnt-from program's
    family, measured and predicted seconds, rows, prefill tokens and whether fine-tune work ran
    just before it): per train family, and for inference steps split by whether fine-tune work
    came before them and whether they ran a prefill chunk. Each group's count, mean absolute
    percentage error, and 50th/90th/99th percentiles of measured - predicted (ms)."""
    groups = collections.defaultdict(list)
    for _, family, measured, predicted, _, prefill, after_train in run["predictions"]:
        if family == "inference":
            family += " after train" if after_train else " after inference"
            family += ", prefill" if prefill else ""
        groups[family].append((measured, predicted))
    found = {}
    for name, pairs in sorted(groups.items()):
        measured, predicted = np.array(pairs).T
        late_ms = 1e3 * (measured - predicted)
        found[name] = dict(
            n=len(pairs),
            mape=float(np.mean(np.abs(measured - predicted) / predicted)),
            **{f"late_p{q}_ms": float(np.percentile(late_ms, q)) for q in (50, 90, 99)},
        )
    return dict(policy=run["policy"], load=run["load"], errors=found)


LATE_RULE = (
    "A late token (TPOT over the SLO) is put on the inference program that emitted it (the "
    "last to start before the token): 'step alone over the SLO' if that program's seconds "
    "exceed the SLO, else 'fill before the step' if a fine-tune program started between the "
    "previous inference program's end and its start, else 'no fill before the step'."
)


def late_tokens(run: dict, slo_ms: float) -> dict:
    """A run's late tokens by cause (`LATE_RULE`), and its inference steps over the SLO."""
    slo_s = slo_ms / 1e3
    timed = _in_trace(run["timeline"]["programs"])
    steps = [(start, s or 0.0) for start, name, s in timed if name == "inference"]
    fills = [start for start, name, _ in timed if name != "inference"]
    step_starts = [start for start, _ in steps]
    causes: collections.Counter[str] = collections.Counter()
    for t, gap in run["timeline"]["tpot"]:
        here = bisect.bisect_right(step_starts, t) - 1
        if gap <= slo_s or here < 0:
            continue
        start, seconds = steps[here]
        previous_end = sum(steps[here - 1]) if here else -1.0
        filled = bisect.bisect_right(fills, start) > bisect.bisect_right(fills, previous_end)
        if seconds > slo_s:
            causes["step alone over the SLO"] += 1
        else:
            causes["fill before the step" if filled else "no fill before the step"] += 1
    return dict(
        policy=run["policy"],
        load=run["load"],
        late_tokens=sum(causes.values()),
        late_tokens_by_cause=dict(causes),
        inference_steps=len(steps),
        steps_over_slo=sum(s > slo_s for _, s in steps),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="a bench/colocate.py --timelines JSON")
    parser.add_argument("--json", type=Path, help="also write the summaries here")
    parser.add_argument("--strip", type=Path, help="write the result here, timelines summarised")
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    slo = {shape: m["tpot_slo_ms"] for shape, m in result["measured"].items()}
    timed = [run for run in result["runs"] if "timeline" in run]
    rows = [summarise(run, slo[run["model"]]) for run in timed]
    late = [late_tokens(run, slo[run["model"]]) for run in timed]
    errors = [prediction_errors(run) for run in timed if "predictions" in run]
    for row in rows + late:
        print(
            ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            )
        )
    for row in errors:
        for name, group in row["errors"].items():
            print(
                f"policy {row['policy']}, load {row['load']}, {name}: "
                + ", ".join(f"{k} {v:.3g}" for k, v in group.items())
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.strip:
        for run in result["runs"]:
            run.pop("timeline", None)
            run.pop("predictions", None)
        # Runs stripped by an earlier invocation keep their summaries.
        result["fill_analysis"] = _merged(result.get("fill_analysis", []), rows)
        earlier = result.get("late_tokens", {}).get("runs", [])
        result["late_tokens"] = dict(rule=LATE_RULE, runs=_merged(earlier, late))
        result["prediction_errors"] = _merged(result.get("prediction_errors", []), errors)
        args.strip.write_text(json.dumps(result, indent=1))


def _merged(earlier: list[dict], new: list[dict]) -> list[dict]:
    """``new``'s summaries, and those of ``earlier``'s runs (policy, load) it has none for."""
    fresh = {(row["policy"], row["load"]) for row in new}
    return [row for row in earlier if (row["policy"], row["load"]) not in fresh] + new


if __name__ == "__main__":
    main()
