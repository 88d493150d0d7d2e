"""`harli-jax generate`: prints text, names the bad flag or file on a user mistake, and compiles
into a persistent cache that a later run loads from."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harli_jax import LLM, SamplingParams
from harli_jax.cli import main


def test_generate_prints_what_the_library_generates(checkpoint, capsys):
    ckpt = checkpoint("llama")
    assert (
        main(
            [
                "generate",
                "--model",
                str(ckpt),
                "--dtype",
                "float32",
                "--prompt",
                "The cat",
                "--max-tokens",
                "6",
            ]
        )
        == 0
    )
    expected = (
        LLM(ckpt, dtype="float32")
        .generate("The cat", SamplingParams(max_tokens=6, temperature=0.0))[0]
        .text
    )
    assert capsys.readouterr().out == expected + "\n"


def test_missing_checkpoint_directory_is_named(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "nope/config.json: not found" in err and "Traceback" not in err


@pytest.mark.parametrize(("flag", "value"), [("--temperature", "-1"), ("--frequency-penalty", "3")])
def test_out_of_range_flag_is_named(checkpoint, capsys, flag, value):
    argv = ["generate", "--model", str(checkpoint("llama")), "--prompt", "hi"]
    assert main([*argv, flag, value]) == 2
    assert f"{flag}={float(value)}" in capsys.readouterr().err


def test_a_run_compiles_into_the_cache_a_later_run_loads_from(checkpoint, tmp_path):
    """``--compile-cache DIR``: the first run writes its programs there; a second run writes
    nothing new (it loaded them all) and prints the same text."""
    cache = tmp_path / "cache"
    argv = ["generate", "--model", str(checkpoint("llama")), "--prompt", "hi", "--max-tokens", "3"]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}

    def run() -> str:
        command = [sys.executable, "-m", "harli_jax.cli", *argv, "--compile-cache", str(cache)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return done.stdout

    first = run()
    entries = set(os.listdir(cache))
    assert entries
    assert run() == first
    assert set(os.listdir(cache)) == entries
