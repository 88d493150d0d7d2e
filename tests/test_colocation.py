"""Co-located serving and fine-tuning on the demo model: every policy serves every request, and
each fine-tunes exactly as much as its rule allows."""

from __future__ import annotations

import json

import pytest

from harli_jax import LLM
from harli_jax.cli import main
from harli_jax.colocate import run_colocated
from harli_jax.demo_task import write_dataset
from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob
from harli_jax.lora.config import LoraConfig
from harli_jax.sched.predictor import Predictor, measure_device_rates
from harli_jax.sched.scheduler import SchedulerConfig
from harli_jax.sched.trace import synthetic_trace


@pytest.fixture(scope="module")
def llm():
    return LLM.demo(max_num_seqs=4, max_model_len=128, page_size=32, prefill_chunk=64)


@pytest.mark.parametrize("policy", ["serve-only", "harli", "naive"])
def test_every_request_is_served_and_training_follows_the_policy(llm, policy, tmp_path):
    data = write_dataset(tmp_path / "task.jsonl")
    config = FineTuneConfig(
        data=data,
        out_dir=tmp_path / "job",
        lora=LoraConfig(r=4),
        steps=1000,
        batch_size=4,
        seq_len=64,
    )
    job = FineTuneJob("job", config, llm.model, llm.tokenizer)
    trace = synthetic_trace(4.0, 3.0, max_len=64, seed=1, mean_prompt=12, mean_output=12)
    report = run_colocated(
        llm,
        job,
        trace,
        SchedulerConfig(policy=policy, tpot_slo_s=0.5),
        predictor=Predictor(measure_device_rates()),
        show_progress=False,
    )
    assert report["requests"] == {"submitted": len(trace), "refused": 0, "finished": len(trace)}
    if policy == "serve-only":
        assert report["finetune_steps"] == 0
    else:
        assert report["finetune_steps"] > 0
        assert report["finetune_tokens"] > 0


@pytest.mark.slow
def test_main_job_learns_the_demo_task(tmp_path, capsys):
    assert main(["train-colocated", "--out", str(tmp_path), "--duration", "10"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["task_accuracy"]["after"] >= report["task_accuracy"]["before"] + 0.3
    assert (tmp_path / "colocation.png").is_file() and (tmp_path / "adapter").is_dir()
