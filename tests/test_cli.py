"""`harli-jax generate`: prints text, and names the bad flag or file on a user mistake."""

from __future__ import annotations

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


def test_out_of_range_flag_is_named(checkpoint, capsys):
    argv = ["generate", "--model", str(checkpoint("llama")), "--prompt", "hi"]
    assert main([*argv, "--temperature", "-1"]) == 2
    assert "--temperature=-1" in capsys.readouterr().err
