"""Incremental detokenisation: the text an output builds token by token is the tokenizer's
decode of all its tokens (also through half characters and special tokens), and the streamed
deltas add up to it."""

from __future__ import annotations

import numpy as np

from harli_jax.engine.output import OutputBuilder
from harli_jax.engine.sampling import SamplingParams
from harli_jax.models.tokenizer import Tokenizer


def test_incremental_text_equals_decoding_everything(checkpoint):
    tokenizer = Tokenizer.from_dir(checkpoint("llama"))
    vocab = tokenizer.backend.get_vocab_size()
    rng = np.random.default_rng(0)
    for _ in range(20):
        # Random ids hit byte tokens (half characters, invalid bytes) and special tokens.
        ids = rng.integers(0, vocab, 40).tolist()
        params = SamplingParams(max_tokens=len(ids), ignore_eos=True)
        builder, streamed = OutputBuilder(tokenizer, params, ()), ""
        for i, token in enumerate(ids):
            delta, finish = builder.append(token, 0.0, {}, at_context_limit=False)
            streamed += delta
            assert tokenizer.decode(ids[: i + 1]).startswith(builder.text)
        assert finish == "length"
        assert builder.text == streamed == tokenizer.decode(ids)
