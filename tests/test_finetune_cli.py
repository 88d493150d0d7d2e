"""`harli-jax finetune`: a job killed mid-run and resumed ends with the very adapter an
uninterrupted run makes (no lost or repeated step), and bad input is named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from harli_jax.cli import main
from harli_jax.llm import DEMO_DIR

ARGS = [
    "finetune",
    "--steps",
    "24",
    "--batch-size",
    "4",
    "--seq-len",
    "64",
    "--checkpoint-every",
    "4",
    "--target-modules",
    "q_proj,v_proj,down_proj",
]


def adapter(out) -> dict[str, np.ndarray]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_killed_and_resumed_job_equals_an_uninterrupted_one(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*ARGS, "--out", str(whole)]) == 0

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "harli_jax.cli", *ARGS, "--out", str(cut)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (cut / "checkpoints" / "4").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoints" / "4").exists() and not (cut / "adapter").exists()

    assert main([*ARGS, "--out", str(cut)]) == 2  # an existing job needs --resume
    assert main([*ARGS, "--out", str(cut), "--resume"]) == 0
    resumed, reference = adapter(cut), adapter(whole)
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], rtol=1e-6, atol=1e-7)


def test_a_job_that_died_before_writing_its_adapter_writes_it_when_resumed(tmp_path):
    """The adapter and ``job.json`` are written after the final checkpoint, off the training
    thread: a job killed between the two writes them on ``--resume``, with no step trained."""
    out = tmp_path / "job"
    assert main([*ARGS, "--out", str(out)]) == 0
    reference = adapter(out)
    shutil.rmtree(out / "adapter")
    (out / "job.json").unlink()
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    resumed = adapter(out)
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name])
    assert json.loads((out / "job.json").read_text())["steps"] == 24


def test_malformed_data_line_is_named(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": \n')
    code = main(
        [
            "finetune",
            "--model",
            str(DEMO_DIR),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_bad_lora_rank_names_the_flag(tmp_path, capsys):
    assert main(["finetune", "--r", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--r" in capsys.readouterr().err
