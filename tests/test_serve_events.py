"""A streamed chunk is one server-sent event whatever its generated text holds: clients that split
the stream into lines with `str.splitlines` (httpx's `aiter_lines`) must not see it cut in two."""

from __future__ import annotations

import json

import pytest
from httpx._decoders import LineDecoder

from harli_jax.serve.completions import event
from harli_jax.serve.protocol import CompletionChoice, CompletionResponse


@pytest.mark.parametrize("text", ["a\x85b", "a\u2028b", "a\u2029b", "é\n\t\x1c"])
def test_a_chunk_is_one_line_for_httpx_and_keeps_its_text(text):
    chunk = CompletionResponse(
        id="cmpl-1",
        object="text_completion",
        created=0,
        model="m",
        choices=[CompletionChoice(index=0, text=text, finish_reason=None)],
    )
    decoder = LineDecoder()
    lines = [line for line in decoder.decode(event(chunk)) + decoder.flush() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"] == text
