"""Specification of the benchmark infrastructure in bench/, checked on the CPU with the tiny shape:
shapes and the decode roofline, timers and probes, result files, random checkpoints, and the
HF / PEFT baselines (each code path once, with the references transformers itself provides)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bench import hf_baseline
from bench.common import (
    SHAPES,
    decode_bytes,
    decode_floor_ms,
    device_name,
    measure_hbm_bandwidth_jax,
    measure_matmul_flops_jax,
    param_count,
    time_jax,
    time_torch_cuda,
    write_result,
)
from bench.make_checkpoint import save_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = SHAPES["tiny"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", dtype="float32")


def _hf_model(shape: dict) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**shape)).eval()


@pytest.mark.parametrize(
    ("name", "published"), [("tinyllama-1.1b", 1_100_048_384), ("llama3-8b", 8_030_261_248)]
)
def test_param_count_matches_published_model_sizes(name: str, published: int) -> None:
    assert param_count(SHAPES[name]) == published


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_is_weights_read_plus_kv_cache_filled_by_hf(tied: bool) -> None:
    shape = TINY | {"tie_word_embeddings": tied}
    model = _hf_model(shape)
    batch, context = 3, 5
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.zeros((batch, context), dtype=torch.long), past_key_values=cache)
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    # Every weight but the embedding table, which contributes the gathered rows only; a tied
    # table is still read in full as lm_head.
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    lm_head_if_tied = model.lm_head.weight.numel() if tied else 0
    expected = 4 * (weights + lm_head_if_tied + batch * shape["hidden_size"]) + kv_bytes
    assert decode_bytes(shape, batch, context, dtype_bytes=4) == expected


def test_decode_floor_is_bytes_over_bandwidth() -> None:
    bytes_per_step = decode_bytes(SHAPES["tinyllama-1.1b"], 32, 1024)
    assert decode_floor_ms(SHAPES["tinyllama-1.1b"], 32, 1024, bw=3e12) == pytest.approx(
        bytes_per_step / 3e12 * 1e3
    )


def test_time_jax_reports_wall_time_percentiles() -> None:
    def sleepy() -> jnp.ndarray:
        time.sleep(0.005)
        return jnp.zeros(())

    timing = time_jax(sleepy, warmup=1, iters=5)
    assert 5.0 <= timing["p10_ms"] <= timing["median_ms"] <= timing["p90_ms"] < 100.0


def test_time_torch_leaves_setup_out_of_the_timing() -> None:
    timing = time_torch_cuda(
        lambda: time.sleep(0.002), warmup=1, iters=5, setup=lambda: time.sleep(0.02)
    )
    assert 2.0 <= timing["median_ms"] < 15.0


def test_roofline_probes_return_plausible_cpu_rates() -> None:
    assert 1e8 < measure_hbm_bandwidth_jax(nbytes=2**22, iters=3) < 1e13
    assert 1e7 < measure_matmul_flops_jax(n=128, iters=3) < 1e14


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("cpu", "cpu"),
        ("NVIDIA RTX PRO 6000", "nvidia-rtx-pro-6000"),
    ],
)
def test_device_name_shortens_device_kinds(kind: str, name: str) -> None:
    assert device_name(kind) == name


def test_device_name_of_this_machine_is_cpu() -> None:
    assert device_name() == "cpu"


def test_write_result_writes_sorted_json_and_prints_a_table(tmp_path: Path, capsys) -> None:
    rows = [{"batch": 1, "ms": 2.5}, {"batch": 32, "ms": None, "oom": True}]
    path = write_result(tmp_path / "r" / "x.json", rows, "python3 bench/x.py", shape="tiny")
    text = path.read_text()
    assert json.loads(text) == {
        "command": "python3 bench/x.py",
        "device": "cpu",
        "rows": rows,
        "shape": "tiny",
    }
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["batch", "ms", "oom"]
    assert table[3].split() == ["32", "-", "True"]


def test_random_checkpoint_loads_in_transformers_with_every_weight(tiny_ckpt: Path) -> None:
    model, info = LlamaForCausalLM.from_pretrained(tiny_ckpt, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    reference, loaded = LlamaConfig(**TINY).to_dict(), model.config.to_dict()
    metadata = {"architectures", "dtype", "_name_or_path"}
    assert all(loaded[k] == v for k, v in reference.items() if k not in metadata)


def test_random_checkpoint_weights_are_scaled_normal_with_unit_norms(tiny_ckpt: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_ckpt)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.mean().item()) < 0.003 and p.std().item() == pytest.approx(0.02, rel=0.1)


def test_sharding_splits_files_without_changing_weights(tiny_ckpt: Path, tmp_path: Path) -> None:
    limit = 100_000
    sharded = save_random_checkpoint(tmp_path, "tiny", dtype="float32", shard_bytes=limit)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(sharded.glob("model-*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == [f.name for f in files]
    whole = LlamaForCausalLM.from_pretrained(tiny_ckpt).state_dict()
    split = LlamaForCausalLM.from_pretrained(sharded).state_dict()
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)


@pytest.mark.slow  # a fresh interpreter importing torch, jax and transformers
def test_checkpoint_script_runs_from_the_repo_root(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "bench/make_checkpoint.py", "--shape", "tiny", "--out", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "model-00001-of-00001.safetensors").exists()


def _decoder_matches_uncached_forward(ckpt: Path, compile: bool, monkeypatch) -> None:
    monkeypatch.setattr(hf_baseline, "_PREFILL_CHUNK_TOKENS", 4)  # prefill 7 tokens in 4 chunks
    model = hf_baseline.load_model(ckpt)
    prompt = torch.randint(TINY["vocab_size"], (2, 7))
    next_tokens = torch.randint(TINY["vocab_size"], (2, 1))
    decoder = hf_baseline.static_decoder(model, prompt, next_tokens, compile=compile)
    with torch.no_grad():
        expected = model(input_ids=torch.cat([prompt, next_tokens], dim=1)).logits[:, -1:]
    for _ in range(3):  # every rewound step sees the same cache
        decoder.rewind()
        torch.testing.assert_close(decoder.step(), expected, rtol=1e-4, atol=1e-4)


def test_static_decoder_step_equals_uncached_forward(tiny_ckpt: Path, monkeypatch) -> None:
    _decoder_matches_uncached_forward(tiny_ckpt, False, monkeypatch)


@pytest.mark.slow
def test_compiled_static_decoder_step_equals_uncached_forward(tiny_ckpt: Path, monkeypatch) -> None:
    _decoder_matches_uncached_forward(tiny_ckpt, True, monkeypatch)


def test_load_model_keeps_one_model_until_free_torch(tiny_ckpt: Path) -> None:
    model = hf_baseline.load_model(tiny_ckpt)
    assert hf_baseline.load_model(tiny_ckpt) is model
    hf_baseline.free_torch()
    assert hf_baseline.load_model(tiny_ckpt) is not model


def test_hf_decode_and_prefill_report_positive_rates_on_cpu(tiny_ckpt: Path) -> None:
    assert hf_baseline.hf_decode_step_ms(tiny_ckpt, 2, 8, compile=False, iters=3) > 0
    assert hf_baseline.hf_prefill_tok_s(tiny_ckpt, 2, 16, warmup=1, iters=2) > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_peft_training_reports_positive_rate_on_cpu(tiny_ckpt: Path, checkpointing: bool) -> None:
    tok_s = hf_baseline.peft_train_tok_s(
        tiny_ckpt, 2, 16, steps=2, warmup=1, gradient_checkpointing=checkpointing
    )
    assert tok_s > 0


def test_out_of_memory_returns_none(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(ckpt_dir: Path) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(hf_baseline, "load_model", no_memory)
    assert hf_baseline.hf_decode_step_ms(tiny_ckpt, 128, 4096, compile=False) is None


def test_the_colocation_ceiling_trains_whole_steps_in_what_slo_long_iterations_leave():
    """A load's ceiling: fine-tune alone x (1 - the solo decode step at its batch / the SLO),
    the step interpolated linearly between the measured batches."""
    from bench.colocate import ceiling

    measured = dict(
        solo_decode_ms={"1": 2.0, "16": 3.5, "32": 4.0},
        tpot_slo_ms=10.0,
        finetune_alone_tok_s=1000.0,
    )
    step_ms = 2.0 + (4 - 1) * (3.5 - 2.0) / (16 - 1)  # batch 4: between 1 and 16
    assert ceiling(measured, 4) == pytest.approx(1000.0 * (1 - step_ms / 10.0))
    assert ceiling(measured, 24) == pytest.approx(1000.0 * (1 - 3.75 / 10.0))


def test_a_colocate_policy_entry_names_a_policy_and_its_variants():
    """`--policies harli:1x22:serial` fixes the cut and starts every fill after the step; a
    variant that is neither is refused by name, before any device work."""
    from bench.colocate import policy_config

    config = policy_config("harli:1x22:serial", 0.02, 0.005)
    assert (config.policy, config.fixed_cut, config.queue_behind) == ("harli", "1x22", False)
    assert policy_config("static", 0.02, 0.005).queue_behind
    assert policy_config("harli:unfilled", 0.02, 0.005).queue_unfilled
    assert policy_config("harli:depth3", 0.02, 0.005).inflight_depth == 3
    assert policy_config("harli:fuse4", 0.02, 0.005).fuse_spans == 4
    margins = policy_config("harli:e90:q50", 0.02, 0.005)
    assert (margins.error_quantile, margins.micro_step_error_quantile) == (0.9, 0.5)
    with pytest.raises(ValueError, match="'fast' is not a cut"):
        policy_config("harli:fast", 0.02, 0.005)
    with pytest.raises(ValueError, match="policy must be one of"):
        policy_config("greedy", 0.02, 0.005)


@pytest.mark.parametrize(
    "meets_below, share",
    [
        (0.6, 0.5625),  # 1 and 3/4 fail, 1/2 meets; 5/8 fails, 9/16 meets
        (1.0, 1.0),  # the whole headroom meets: nothing above it to halve toward
        (0.1, 0.0625),  # every quarter step fails: 1/8 fails, 1/16 meets (halved from 0)
        (0.0, 0.0),  # nothing meets: no budget at all
    ],
)
def test_static_tuning_takes_the_largest_share_that_meets_the_slo(meets_below, share):
    """Static's budget is the largest share of the headroom that keeps the SLO, to two halvings
    past the quarter steps; bursty traffic, which failed every quarter step on the H100, gets
    the halvings below a quarter too."""
    from bench.colocate_runs import largest_share

    assert largest_share(lambda s: s <= meets_below) == share
