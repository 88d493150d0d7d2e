"""Memory pressure in the unified arena: a burst of requests makes a running fine-tune job yield
its pages mid-step; every request is served, and the job resumes when load drops and ends with the
adapter an undisturbed run trains."""

from __future__ import annotations

import jax
import numpy as np

from harli_jax import LLM, SamplingParams
from harli_jax.demo_task import write_dataset
from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob, granularities
from harli_jax.lora.config import LoraConfig
from harli_jax.memory.page_table import Owner

STEPS, ROWS, SEQ = 3, 4, 64
BURST, PROMPT, OUTPUT = 4, 60, 40  # 100 tokens each: 4 pages of 32


def make(tmp_path, name: str, num_pages: int | None = None) -> tuple[LLM, FineTuneJob]:
    llm = LLM.demo(
        max_num_seqs=BURST, max_model_len=128, page_size=32, prefill_chunk=64, num_pages=num_pages
    )
    config = FineTuneConfig(
        data=write_dataset(tmp_path / "task.jsonl"),
        out_dir=tmp_path / name,
        lora=LoraConfig(r=4),
        steps=STEPS,
        batch_size=ROWS,
        seq_len=SEQ,
        warmup_steps=1,
        checkpoint_every=100,
    )
    job = FineTuneJob("job", config, llm.model, llm.tokenizer)
    job.use_arena(llm.engine.arena)
    return llm, job


def run(llm: LLM, job: FineTuneJob, burst: bool) -> list:
    """One micro-step, then one engine step, in turn (the co-located loop, deterministically);
    the burst arrives in the middle of the second train step."""
    core, cut = llm.engine, granularities(job.trainer.num_layers, ROWS)[-1]
    finished, sent = [], False
    while not job.done or core.has_unfinished():
        if not job.done and (micro := job.next_micro_step(cut)) is not None:
            job.run(micro)
        if burst and not sent and job.step == 1 and job.in_step:
            params = SamplingParams(max_tokens=OUTPUT, ignore_eos=True)
            for i in range(BURST):
                core.add_request([5 + i] * PROMPT, params)
            sent = True
        if core.has_unfinished():
            finished += [out for out in core.step() if out.finished]
    return finished


def test_a_burst_makes_the_job_yield_and_it_still_trains_the_undisturbed_adapter(tmp_path):
    llm, job = make(tmp_path, "alone")
    assert run(llm, job, burst=False) == [] and job.yields == 0
    expected = [np.asarray(x) for x in jax.tree.leaves(job.trainer.lora)]
    lease = job.trainer._arena_steps.lease_size
    # Room for the burst's KV pages, or for the job's lease, never for both at once.
    kv_pages = BURST * -(-(PROMPT + OUTPUT) // 32)
    llm, job = make(tmp_path, "pressed", num_pages=1 + kv_pages + lease - 1)
    arena = llm.engine.arena

    finished = run(llm, job, burst=True)

    assert len(finished) == BURST and all(len(out.token_ids) == OUTPUT for out in finished)
    assert job.yields >= 1 and job.step == STEPS
    assert Owner("finetune", "job") not in arena.pages and arena.pages.used_by("kv") == 0
    for got, want in zip(jax.tree.leaves(job.trainer.lora), expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)
