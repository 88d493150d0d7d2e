"""The co-location benchmark's results file (`bench/colocate.py`): its table rows, merged across
invocations by (policy, load, model), each run's other numbers, per shape what the runs were
derived from, and every invocation's command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shlex
import sys
from pathlib import Path

from bench import common

POLICY_ORDER = ("serve-only", "harli", "static", "naive")


@dataclasses.dataclass
class Results:
    """What the JSON holds: table rows, each run's other numbers, per shape what the runs were
    derived from, and every invocation's command. Loaded from the file if it exists (same
    device), merged by (policy, load, model), saved after every run."""

    path: Path
    rows: list[dict] = dataclasses.field(default_factory=list)
    runs: list[dict] = dataclasses.field(default_factory=list)
    measured: dict[str, dict] = dataclasses.field(default_factory=dict)
    commands: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def open(cls, path: Path) -> Results:
        results = cls(path)
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("device") == common.device_name():
                results.rows, results.runs = old.get("rows", []), old.get("runs", [])
                results.measured = old.get("measured", {})
                results.commands = old.get("commands") or [old["command"]]
            else:
                print(f"{path} holds {old.get('device')} results: replacing them", flush=True)
        results.commands.append(shlex.join(["python3", *sys.argv]))
        return results

    def put(self, row: dict, run: dict) -> None:
        """Adds a run's row and details, replacing any of the same (policy, load, model)."""
        ident = (row["policy"], row["load"], row["model"])
        same = lambda r: (r["policy"], r["load"], r["model"]) == ident  # noqa: E731
        self.rows = [r for r in self.rows if not same(r)] + [row]
        self.runs = [r for r in self.runs if not same(r)] + [run]
        order = {p: i for i, p in enumerate(POLICY_ORDER)}
        key = lambda r: (r["model"], r["load"] != "light", order.get(r["policy"], 9))  # noqa: E731
        self.rows.sort(key=key)
        self.runs.sort(key=key)

    def busy_share(self, policy: str, load: str, model: str) -> float | None:
        for run in self.runs:
            if (run["policy"], run["load"], run["model"]) == (policy, load, model):
                return run.get("busy_share")
        return None

    def save(self, final: bool = False, **top) -> None:
        """Writes the file (``partial`` until the invocation ends), so a timeout keeps it."""
        top = dict(runs=self.runs, measured=self.measured, commands=self.commands, **top)
        if final:
            common.write_result(self.path, self.rows, self.commands[-1], **top)
            return
        with contextlib.redirect_stdout(io.StringIO()):
            common.write_result(self.path, self.rows, self.commands[-1], partial=True, **top)


def finite(row: dict) -> dict:
    """NaN (e.g. no TPOT sample) as None, so the JSON is standard."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
