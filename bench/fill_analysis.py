"""Where each co-located iteration's time went, from a `bench/colocate.py --timelines` result.

An iteration runs from one inference program's start to the next's: the inference program,
then the fine-tune programs dispatched before the next one (its fill), then host time. For each
run this prints, over the iterations that ran fine-tune work: their median length against the
SLO, the inference program's, the fill's programs' (the seconds each was measured at, so a
program the host saw late adds nothing), the rest (host time and device idle), micro-steps per
fill, and fine-tune tokens per millisecond of train programs and per millisecond of iteration.

    python3 bench/fill_analysis.py bench/results/colocate-h100-timelines.json [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def iterations(programs: list) -> list[dict]:
    """The run's iterations from its program timeline (start, family, seconds), in order; the
    last inference program, with no next to end it, opens none."""
    timed = sorted((p for p in programs if p[0] >= 0), key=lambda p: p[0])
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
                families=[name for _, name, _ in fill],
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
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="a bench/colocate.py --timelines JSON")
    parser.add_argument("--json", type=Path, help="also write the summaries here")
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    slo = {shape: m["tpot_slo_ms"] for shape, m in result["measured"].items()}
    rows = [summarise(run, slo[run["model"]]) for run in result["runs"] if "timeline" in run]
    for row in rows:
        print(
            ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            )
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
