"""What a request gets back: the text assembled from its tokens, stop handling, finish reasons.

Owns the rules a user of the OpenAI API expects: a stop string ends the output and is not part of
it; text is streamed only once it can no longer turn out to be the start of a stop string or half
of a multi-byte character; EOS and ``stop_token_ids`` end with reason ``"stop"``, ``max_tokens``
or the context limit with ``"length"``; no stop counts before ``min_tokens`` (until then the stop
tokens are kept out of the draw). Text is decoded incrementally (a short window per token, as in
vLLM), so a token costs the same at any output length.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

from harli_jax.engine.sampling import SamplingParams

_REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the requested number of alternatives, best first


@dataclasses.dataclass
class RequestOutput:
    """A request's output so far; ``text_delta``/``new_token_ids`` are what this step added."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    text_delta: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputBuilder:
    """Accumulates one request's tokens into text and decides when it stops."""

    def __init__(self, tokenizer, params: SamplingParams, eos_token_ids: tuple[int, ...]):
        self._tokenizer = tokenizer
        self._params = params
        self._stop_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(eos_token_ids)
        )
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self.token_ids: list[int] = []
        self._counts: Counter[int] = Counter()  # of token_ids, for the penalties
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.text = ""
        self._emitted = 0
        # Incremental decoding: token_ids[:_read] are in `text`; decoding starts at _prefix, the
        # last point where the decoded text ended on a whole character.
        self._prefix = self._read = 0
        self.finish_reason: str | None = None

    def logit_bias(self) -> dict[int, float]:
        """What the next token's logits get added (:meth:`SamplingParams.bias`), the stop
        tokens ruled out while the output is shorter than ``min_tokens``."""
        bias = self._params.bias(self._counts)
        if len(self.token_ids) < self._params.min_tokens:
            bias |= dict.fromkeys(self._stop_ids, -math.inf)
        return bias

    def append(self, token_id: int, logprob: float, top: dict[int, float], at_context_limit: bool):
        """Adds one sampled token; returns (new text safe to stream, finish reason or None)."""
        self.token_ids.append(token_id)
        self._counts[token_id] += 1
        if self.logprobs is not None:
            self.logprobs.append(TokenLogprob(token_id, logprob, top))
        if token_id in self._stop_ids:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self._params.max_tokens or at_context_limit:
            self.finish_reason = "length"
        if self._tokenizer is not None:
            self.text += self._decode_new()
            if len(self.token_ids) >= self._params.min_tokens:
                self._apply_stop_strings()
        return self._release(), self.finish_reason

    def _decode_new(self) -> str:
        """The text that tokens past ``_read`` add: decoding the window from ``_prefix`` with and
        without them and taking the difference equals decoding the whole output (the window
        starts on a character boundary, and the decoders strip the same leading space from both).
        A piece that ends in half a character waits for the next token, unless the output ends."""
        # EOS/stop-id tokens are not part of the text (as in vLLM, skip_special_tokens=True).
        decode, ids = self._tokenizer.decode, self.token_ids
        before = decode(ids[self._prefix : self._read])
        window = decode(ids[self._prefix :])
        if len(window) <= len(before):
            return ""
        if window.endswith(_REPLACEMENT) and self.finish_reason is None:
            return ""
        self._prefix, self._read = self._read, len(ids)
        return window[len(before) :]

    def _apply_stop_strings(self) -> None:
        search_from = max(0, self._emitted - self._holdback)
        hits = [(i, s) for s in self._params.stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)[0]]
            self.finish_reason = "stop"

    def _release(self) -> str:
        if self.finish_reason is not None:
            safe = len(self.text)
        else:
            safe = len(self.text.rstrip(_REPLACEMENT)) - self._holdback
        if safe <= self._emitted:
            return ""
        delta, self._emitted = self.text[self._emitted : safe], safe
        return delta
