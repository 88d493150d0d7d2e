"""What a request adds to the logits: its ``logit_bias`` and OpenAI's presence and frequency
penalties (a token's logit loses the presence penalty once the output holds it and the frequency
penalty for each time it does). Checked against a float64 numpy computation of the formula, and
through the engine against transformers' greedy `generate` with the same formula as its logits
processor."""

from __future__ import annotations

from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

from harli_jax import LLM, SamplingParams
from harli_jax.engine.sampling import LogitBias, SamplerVariant, add_bias

PROMPTS = ["The cat sat on the", "Once upon a time there was a very long story about a"]


def openai_biased(logits: np.ndarray, output: list[int], params: SamplingParams) -> np.ndarray:
    """In float64: mu[j] + bias[j] - c[j] * frequency - (c[j] > 0) * presence."""
    vocab = logits.shape[-1]
    counts = np.bincount(np.asarray(output, np.int64), minlength=vocab)
    bias = np.zeros(vocab)
    for token, value in params.logit_bias:
        bias[token] = value
    return (
        logits.astype(np.float64)
        + bias
        - counts * params.frequency_penalty
        - (counts > 0) * params.presence_penalty
    )


@pytest.fixture(scope="module")
def llama(checkpoint) -> tuple[LLM, AutoModelForCausalLM, AutoTokenizer]:
    """Ours, transformers' model and the tokenizer, of one checkpoint, loaded once."""
    ckpt = checkpoint("llama")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return LLM(ckpt, dtype="float32"), hf, AutoTokenizer.from_pretrained(ckpt)


def test_biased_logits_follow_openais_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)  # the last row: padding
    outputs = [[4, 4, 7, 49, 4], [], [0, 1, 1]]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 3.0, 9: -1}),
        SamplingParams(presence_penalty=1.0, logit_bias={2: 100.0}),
        SamplingParams(presence_penalty=-0.5, frequency_penalty=-1.5),
    ]
    biases = [p.bias(Counter(output)) for p, output in zip(params, outputs)]
    got = np.asarray(add_bias(jnp.asarray(logits), LogitBias.build(biases, 4, 64)))
    for row, (output, p) in enumerate(zip(outputs, params)):
        want = openai_biased(logits[row], output, p)
        np.testing.assert_allclose(got[row], want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[3], logits[3])


def test_only_a_biased_batch_compiles_the_bias_in_and_its_window_doubles():
    assert SamplerVariant.of([SamplingParams()], 0).bias_window == 0
    assert SamplerVariant.of([SamplingParams()], 3).bias_window == 64
    assert SamplerVariant.of([SamplingParams()], 65).bias_window == 128
    assert SamplingParams(frequency_penalty=0.1).bias(Counter()) == {}  # nothing generated yet


class OpenAIBias(LogitsProcessor):
    """transformers' side of the comparison: the formula on the tokens after the prompt."""

    def __init__(self, prompt_len: int, params: SamplingParams):
        self.prompt_len, self.params = prompt_len, params

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        output = input_ids[0, self.prompt_len :].tolist()
        biased = openai_biased(scores[0].numpy(), output, self.params)
        return torch.from_numpy(biased).to(scores.dtype)[None]


@pytest.mark.parametrize(
    "asked",
    [
        dict(frequency_penalty=2.0),
        dict(presence_penalty=1.5),
        dict(presence_penalty=0.7, frequency_penalty=-0.4),
        dict(logit_bias={5: 4.0, 17: 2.5, 30: -100.0}),
    ],
)
def test_greedy_generation_with_a_bias_equals_transformers(llama, asked):
    llm, hf, tokenizer = llama
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, **asked)
    outs = llm.generate(PROMPTS, params)
    plain = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] != [o.token_ids for o in plain]  # the bias bites
    for prompt, out in zip(PROMPTS, outs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        ref = hf.generate(
            ids,
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            logits_processor=[OpenAIBias(ids.shape[1], params)],
        )[0, ids.shape[1] :]
        assert out.token_ids == ref.tolist()


@pytest.mark.parametrize(
    "bad",
    [
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3.0),
        dict(logit_bias={3: 101.0}),
        dict(logit_bias={-1: 1.0}),
    ],
)
def test_a_bias_out_of_range_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_a_logit_bias_beyond_the_vocabulary_is_refused(llama):
    llm = llama[0]
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(PROMPTS[:1], SamplingParams(logit_bias={vocab: 1.0}))


def test_min_tokens_holds_the_stop_token_back_as_transformers_min_new_tokens_does(llama):
    llm, hf, tokenizer = llama
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    free = llm.generate(PROMPTS[:1], SamplingParams(**greedy))[0].token_ids
    stop = free[2]  # a stop token the free run emits third
    early = llm.generate(PROMPTS[:1], SamplingParams(**greedy, stop_token_ids=(stop,)))[0]
    assert len(early.token_ids) <= 3 and early.finish_reason == "stop"
    held = SamplingParams(**greedy, stop_token_ids=(stop,), min_tokens=6)
    out = llm.generate(PROMPTS[:1], held)[0]
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=12, min_new_tokens=6, eos_token_id=stop, do_sample=False)[
        0, ids.shape[1] :
    ]
    assert out.token_ids == ref.tolist()
    assert len(out.token_ids) >= 6


def test_a_stop_string_does_not_end_the_output_before_min_tokens(llama):
    llm = llama[0]
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    free = llm.generate(PROMPTS[:1], SamplingParams(**greedy))[0]
    stop = free.text[2:5]
    assert llm.generate(PROMPTS[:1], SamplingParams(**greedy, stop=[stop]))[0].text != free.text
    held = llm.generate(PROMPTS[:1], SamplingParams(**greedy, stop=[stop], min_tokens=12))[0]
    assert (held.text, held.finish_reason) == (free.text, "length")
