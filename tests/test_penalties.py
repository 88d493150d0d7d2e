"""Presence and frequency penalties, as OpenAI defines them: a token's logit loses the presence
penalty once the output holds it and the frequency penalty for each time it does. Checked
against a float64 numpy computation of the formula, and through the engine against
transformers' greedy `generate` with the same formula as its logits processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

from harli_jax import LLM, SamplingParams
from harli_jax.engine.sampling import Penalties, SamplerVariant, penalize

PROMPTS = ["The cat sat on the", "Once upon a time there was a very long story about a"]


def openai_penalized(logits: np.ndarray, output: list[int], presence: float, frequency: float):
    """The formula in float64: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""
    counts = np.bincount(np.asarray(output, np.int64), minlength=logits.shape[-1])
    return logits.astype(np.float64) - counts * frequency - (counts > 0) * presence


def test_penalized_logits_follow_openais_formula():
    rng = np.random.default_rng(0)
    vocab, window = 50, 64
    logits = rng.normal(size=(4, vocab)).astype(np.float32)  # the last row: padding
    outputs = [[4, 4, 7, 49, 4], [], [0, 1, 1]]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=1.0),
        SamplingParams(presence_penalty=-0.5, frequency_penalty=-1.5),
    ]
    got = np.asarray(penalize(logits, Penalties.build(params, outputs, 4, window)))
    for row, (output, p) in enumerate(zip(outputs, params)):
        want = openai_penalized(logits[row], output, p.presence_penalty, p.frequency_penalty)
        np.testing.assert_allclose(got[row], want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[3], logits[3])


def test_only_a_penalized_request_holds_its_output_and_its_window_doubles():
    plain, penalized = SamplingParams(), SamplingParams(frequency_penalty=0.1)
    assert SamplerVariant.of([plain], [500]).penalty_window == 0
    assert SamplerVariant.of([plain, penalized], [500, 3]).penalty_window == 64
    assert SamplerVariant.of([plain, penalized], [5, 65]).penalty_window == 128


class OpenAIPenalties(LogitsProcessor):
    """transformers' side of the comparison: the formula on the tokens after the prompt."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        output = input_ids[0, self.prompt_len :].tolist()
        penalized = openai_penalized(scores[0].numpy(), output, self.presence, self.frequency)
        return torch.from_numpy(penalized).to(scores.dtype)[None]


@pytest.mark.parametrize(("presence", "frequency"), [(0.0, 2.0), (1.5, 0.0), (0.7, -0.4)])
def test_greedy_generation_with_penalties_equals_transformers(checkpoint, presence, frequency):
    ckpt = checkpoint("llama")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    params = SamplingParams(
        max_tokens=24,
        temperature=0.0,
        ignore_eos=True,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )
    outs = LLM(ckpt, dtype="float32").generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        processor = OpenAIPenalties(ids.shape[1], presence, frequency)
        ref = hf.generate(
            ids,
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            logits_processor=[processor],
        )[0, ids.shape[1] :]
        assert out.token_ids == ref.tolist()


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3.0)])
def test_a_penalty_out_of_range_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
