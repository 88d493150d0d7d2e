"""Specification of bench/train.py's bookkeeping, with fakes in place of the GPU: a point that runs
out of device memory is measured again with rematerialisation on that side and says so, and a
run's results merge into the file that earlier runs wrote."""

from __future__ import annotations

import types

import jax.numpy as jnp
import pytest

from bench import hf_baseline
from bench import train as bench_train

OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 57982058496 bytes."


class FakeTrainer:
    """Runs out of device memory unless it rematerialises."""

    def __init__(self, remat: bool, error: str = OOM) -> None:
        self.remat, self.error = remat, error

    def train_step(self, batch):
        if not self.remat:
            raise RuntimeError(self.error)
        return {"loss": jnp.float32(1.0)}


BASE = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=64))


def test_ours_is_measured_again_with_remat_after_running_out_of_memory(monkeypatch):
    made = []
    monkeypatch.setattr(
        bench_train, "_trainer", lambda base, remat=False: made.append(remat) or FakeTrainer(remat)
    )
    measure = lambda remat: bench_train.ours_tok_s(BASE, (2, 8), 2, 1, remat)  # noqa: E731

    tok_s, remat = bench_train.with_remat_retry(measure)

    assert made == [False, True] and remat and tok_s > 0


def test_other_errors_are_not_taken_for_out_of_memory(monkeypatch):
    monkeypatch.setattr(bench_train, "_trainer", lambda base, remat=False: FakeTrainer(remat, "x"))
    with pytest.raises(RuntimeError, match="x"):
        bench_train.ours_tok_s(BASE, (2, 8), 2, 1)


def test_a_point_that_fits_is_measured_once_and_forced_remat_skips_the_plain_run():
    calls = []

    def measure(remat):
        calls.append(remat)
        return 10.0

    assert bench_train.with_remat_retry(measure) == (10.0, False)
    assert bench_train.with_remat_retry(measure, remat=True) == (10.0, True)
    assert calls == [False, True]
    assert bench_train.with_remat_retry(lambda remat: None) == (None, True)


def test_peft_retries_with_gradient_checkpointing(monkeypatch):
    seen = []

    def peft_train_tok_s(ckpt, rows, seq_len, gradient_checkpointing=False, **kwargs):
        seen.append((rows, gradient_checkpointing))
        return None if rows > 4 and not gradient_checkpointing else 100.0 * rows

    monkeypatch.setattr(hf_baseline, "peft_train_tok_s", peft_train_tok_s)
    monkeypatch.setattr(hf_baseline, "free_torch", lambda: None)

    results = bench_train.peft_points("ckpt", [(4, 8), (16, 8)], steps=1, warmup=0)

    assert results == {(4, 8): (400.0, False), (16, 8): (1600.0, True)}
    assert seen == [(4, False), (16, False), (16, True)]


def test_rows_say_which_side_rematerialised():
    notes = []
    fits = bench_train.point_row("m", (4, 8), (20.0, False), (10.0, False), notes)
    both = bench_train.point_row("m", (16, 8), (30.0, True), (15.0, True), notes)
    lost = bench_train.point_row("m", (32, 8), (None, True), None, notes)
    forced = bench_train.point_row("m", (8, 8), (5.0, True), (5.0, True), notes, forced=True)

    assert (fits["ratio"], fits["remat"]) == (2.0, False)
    assert (both["ratio"], both["remat"], both["ours_remat"], both["peft_remat"]) == (
        2.0,
        True,
        True,
        True,
    )
    assert lost["ratio"] is None and lost["peft_tok_s"] is None
    assert forced["remat"] and forced["ratio"] == 1.0
    assert notes == [
        "m 16x8: ours ran out of device memory without remat",
        "m 16x8: peft ran out of device memory without remat",
        "m 32x8: ours ran out of device memory",
    ]


def row(model, tokens, value):
    return dict(model=model, tokens=tokens, ours_tok_s=value)


def test_a_run_replaces_its_points_and_keeps_the_others(tmp_path, monkeypatch):
    path = tmp_path / "train-cpu.json"
    monkeypatch.setattr(bench_train.sys, "argv", ["bench/train.py", "--shapes", "tiny"])
    first = [row("tiny", "4x8", 1.0), row("tiny", "16x8", None)]
    micro = [dict(model="tiny", tokens="4x8", kind="update", median_ms=3.0)]
    bench_train.save(
        path,
        {},
        first,
        final=True,
        notes=["tiny 16x8: ours ran out of device memory"],
        micro_steps=micro,
        cuts=[],
        wall_s=1.0,
    )
    monkeypatch.setattr(bench_train.sys, "argv", ["bench/train.py", "--shapes", "big"])
    second = [row("big", "4x8", 3.0), row("tiny", "16x8", 2.0)]
    bench_train.save(path, bench_train.read_result(path), second, notes=[], micro_steps=[])

    result = bench_train.read_result(path)

    assert [(r["model"], r["tokens"], r["ours_tok_s"]) for r in result["rows"]] == [
        ("tiny", "4x8", 1.0),
        ("big", "4x8", 3.0),
        ("tiny", "16x8", 2.0),
    ]
    assert result["micro_steps"] == micro and result["notes"] == []
    assert result["partial"] is True and result["wall_s"] == 1.0
    assert result["commands"] == [
        "python3 bench/train.py --shapes tiny",
        "python3 bench/train.py --shapes big",
    ]
    assert result["command"] == result["commands"][-1]


def test_a_file_from_before_commands_were_kept_starts_the_list_with_its_command():
    previous = {"command": "python3 bench/train.py", "rows": [row("tiny", "4x8", 1.0)]}

    merged = bench_train.merge_results(previous, [], "python3 bench/train.py --shapes big")

    assert merged["commands"] == ["python3 bench/train.py", "python3 bench/train.py --shapes big"]
    assert merged["rows"] == previous["rows"]
