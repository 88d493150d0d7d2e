"""`harli-jax profile` writes a calibration that `train-colocated --profile` starts from, and a
profile made for another setup is refused naming the flag."""

from __future__ import annotations

import json

import pytest

from harli_jax.cli import main
from harli_jax.cli_profile import lora_shape, model_identity

SMALL_ENGINE = ["--max-num-seqs", "2", "--max-model-len", "128", "--prefill-chunk", "32"]
SMALL_JOB = ["--batch-size", "2", "--seq-len", "32", "--r", "4"]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "demo.json"
    assert main(["profile", "--out", str(path), *SMALL_ENGINE, *SMALL_JOB]) == 0
    return path


def test_profile_holds_the_predictor_and_what_it_was_made_for(profile):
    saved = json.loads(profile.read_text())
    meta = saved["meta"]
    assert meta["model"] == model_identity(None, None)
    assert meta["lora"] == lora_shape(4, "all-linear", 2, 32)
    assert meta["engine"]["max_num_seqs"] == 2 and meta["engine"]["page_size"] == 32
    assert set(meta["programs"]) == set(saved["programs"])
    assert any(k.startswith(f"train/{meta['lora']}/update") for k in meta["programs"])
    assert meta["calibration"]["cuts"] and meta["calibration"]["inference_s"]
    assert meta["errors"]["inference"]["n"] > 0


def test_train_colocated_starts_from_the_profile(profile, tmp_path, capsys):
    args = ["train-colocated", "--profile", str(profile), "--out", str(tmp_path)]
    args += [*SMALL_ENGINE, *SMALL_JOB, "--duration", "1", "--rate", "2", "--steps", "2"]
    args += ["--mean-prompt", "8", "--mean-output", "8"]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["started_calibrated"] is True


def test_a_profile_for_another_lora_shape_is_refused(profile, tmp_path, capsys):
    args = ["train-colocated", "--profile", str(profile), "--out", str(tmp_path)]
    args += [*SMALL_ENGINE, "--batch-size", "2", "--seq-len", "32", "--r", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--profile" in err and "lora" in err and "r8-" in err
