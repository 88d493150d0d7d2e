"""Generation against independent references: transformers' greedy `generate`, our own
full-sequence forward (for the paged, chunked path), and numpy (for the sampler's support)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harli_jax import LLM, SamplingParams
from harli_jax.engine.sampling import SamplerInputs, sample

PROMPTS = ["The cat sat on the", "Once upon a time there was a very long story about a"]


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2"])
def test_greedy_generation_equals_transformers(checkpoint, family):
    ckpt = checkpoint(family)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    outs = LLM(ckpt, dtype="float32").generate(
        PROMPTS, SamplingParams(max_tokens=32, temperature=0.0)
    )
    for prompt, out in zip(PROMPTS, outs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :]
        assert out.token_ids == ref.tolist()
        assert out.text == tokenizer.decode(ref, skip_special_tokens=True)


def test_paged_decode_after_chunked_prefill_equals_full_forward(checkpoint):
    # Pages of 4 tokens and prefill chunks of 8 make every boundary case happen.
    llm = LLM(checkpoint("llama"), dtype="float32", page_size=4, prefill_chunk=8)
    prompt = list(range(5, 28))  # 23 tokens: three chunks, the last one partial
    out = llm.generate(
        [prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)
    )[0]
    full = llm.logits([prompt + out.token_ids])[0]
    reference = jax.nn.log_softmax(full[len(prompt) - 1 : -1], axis=-1)
    assert out.token_ids == list(np.argmax(reference, axis=-1))
    paged = [lp.logprob for lp in out.logprobs]
    np.testing.assert_allclose(paged, reference[np.arange(20), out.token_ids], atol=1e-4)


def test_batch_composition_does_not_change_greedy_outputs(checkpoint):
    llm = LLM(checkpoint("qwen2"), dtype="float32", max_num_seqs=4, page_size=4)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[3 + i] * (2 + 3 * i) for i in range(6)]  # more requests than decode slots
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_preemption_under_page_pressure_loses_nothing(checkpoint):
    # 9 pages of 4 tokens cannot hold three 20-token sequences at once: someone is preempted.
    llm = LLM(checkpoint("llama"), dtype="float32", page_size=4, num_pages=10)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[7, 8, 9, 10], [11, 12, 13], [14, 15]]
    squeezed = llm.generate(prompts, params)
    roomy = LLM(checkpoint("llama"), dtype="float32").generate(prompts, params)
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]


def test_seeded_sampling_is_reproducible_and_seed_dependent(checkpoint):
    llm = LLM(checkpoint("mistral"), dtype="float32")

    def draw(seed):
        params = SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)
        return llm.generate(PROMPTS, params)

    first, again, other = draw(7), draw(7), draw(8)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert [o.token_ids for o in first] != [o.token_ids for o in other]


def _support(
    logits: np.ndarray, top_k: int, top_p: float, min_p: float = 0.0, draws: int = 400
) -> set[int]:
    batch = np.repeat(logits[None], draws, axis=0)
    inputs = SamplerInputs(
        temperature=np.ones(draws, np.float32),
        top_k=np.full(draws, top_k, np.int32),
        top_p=np.full(draws, top_p, np.float32),
        seed=np.arange(draws, dtype=np.uint32),
        step=np.zeros(draws, np.int32),
        min_p=np.full(draws, min_p, np.float32),
    )
    return set(np.asarray(sample(batch, inputs).tokens).tolist())


def test_top_k_restricts_the_support_to_the_k_most_likely():
    logits = np.random.default_rng(0).normal(size=64).astype(np.float32)
    assert _support(logits, top_k=3, top_p=1.0) == set(np.argsort(logits)[-3:].tolist())


def test_top_p_restricts_the_support_to_the_nucleus():
    probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04], np.float64)
    logits = np.log(probs).astype(np.float32)
    # Smallest set whose mass reaches 0.75: {0, 1, 2} (0.4 + 0.3 < 0.75 <= 0.9).
    assert _support(logits, top_k=0, top_p=0.75) == {0, 1, 2}
    assert _support(logits, top_k=2, top_p=0.95) == {0, 1}


def test_min_p_keeps_the_tokens_at_least_that_share_of_the_likeliest():
    probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04], np.float64)
    logits = np.log(probs).astype(np.float32)
    # p / p_max: 1, 0.75, 0.5, 0.15, 0.1.
    assert _support(logits, top_k=0, top_p=1.0, min_p=0.4) == {0, 1, 2}
    assert _support(logits, top_k=0, top_p=1.0, min_p=0.12) == {0, 1, 2, 3}
    assert _support(logits, top_k=2, top_p=1.0, min_p=0.12) == {0, 1}


def test_stop_string_ends_the_output_and_is_not_part_of_it(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32")
    free = llm.generate(
        PROMPTS[:1], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    )[0]
    stop = free.text[5:8]
    cut = llm.generate(
        PROMPTS[:1], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, stop=[stop])
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]


def test_max_tokens_and_stop_token_ids_set_the_finish_reason(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32")
    free = llm.generate(
        [[4, 5, 6]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )[0]
    assert (len(free.token_ids), free.finish_reason) == (8, "length")
    stopped = llm.generate(
        [[4, 5, 6]],
        SamplingParams(
            max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[free.token_ids[2]]
        ),
    )[0]
    assert stopped.token_ids == free.token_ids[:3]
    assert stopped.finish_reason == "stop"


def test_prompt_longer_than_the_context_is_refused(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32", max_model_len=32)
    with pytest.raises(ValueError, match="context is 32"):
        llm.generate([list(range(40))])


@pytest.mark.parametrize(
    "bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(logprobs=9)]
)
def test_invalid_sampling_params_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_top_k_one_through_the_engine_is_greedy(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32")
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    topk1 = llm.generate(
        PROMPTS, SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
    )
    assert [o.token_ids for o in topk1] == [o.token_ids for o in greedy]
