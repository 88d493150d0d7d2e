"""Specification of harli_jax.models.tokenizer, checked against transformers.AutoTokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import harli_jax
from harli_jax.models.tokenizer import IncrementalDecoder, Tokenizer

DEMO_DIR = Path(harli_jax.__file__).parent / "assets" / "demo"

TEXTS = [
    "Once upon a time, a little fox lived near the river.",
    "  leading, double  spaces,\ttabs\n\nand blank lines \n",
    "café naïve Straße — “quotes” 東京 こんにちは 🙂👍🏽",
    "<s>specials</s> inline <|user|>hi<|end|><pad>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What color is the sky?"}],
    [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "  What sound does a duck make?  "},
        {"role": "assistant", "content": "A duck says quack."},
        {"role": "user", "content": "And a cow? 🐄"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 東京"},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
    ],
]
# CHATS[2] with the assistant turns wrapped in transformers' {% generation %} markers, so that
# transformers itself computes the assistant-token mask.
GENERATION_TEMPLATE = """\
{{ bos_token }}{% for message in messages %}
<|{{ message['role'] }}|>
{% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] | trim }}<|end|>{% endgeneration %}
{% else %}
{{ message['content'] | trim }}<|end|>
{% endif %}

{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""


@pytest.fixture(scope="module", params=["test-checkpoint", "demo-model"])
def model_dir(request, checkpoint) -> Path:
    """Every specification holds for the test checkpoints and for the shipped demo model."""
    if request.param == "demo-model":
        return DEMO_DIR
    return checkpoint("llama")


@pytest.fixture(scope="module")
def ours(model_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def edited_copy(model_dir: Path, dest: Path, **config_changes: object) -> Path:
    """A copy of the checkpoint's tokenizer files with tokenizer_config.json entries changed
    (a value of None removes the entry)."""
    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(model_dir / name, dest / name)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not None}
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, hf, text, add_special_tokens):
    assert ours.encode(text, add_special_tokens) == hf.encode(
        text, add_special_tokens=add_special_tokens
    )


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(ours, hf, text, skip_special_tokens):
    ids = hf.encode(text)
    assert ours.decode(ids, skip_special_tokens) == hf.decode(
        ids, skip_special_tokens=skip_special_tokens
    )


def test_special_token_ids_and_vocab_size_match_transformers(ours, hf):
    assert (ours.bos_token_id, ours.pad_token_id, ours.vocab_size) == (
        hf.bos_token_id,
        hf.pad_token_id,
        len(hf),
    )


def test_eos_token_ids_are_the_generation_config_stop_ids(ours, model_dir):
    # save_checkpoint puts </s> in config.json and [</s>, <|end|>] in generation_config.json.
    expected = transformers.GenerationConfig.from_pretrained(model_dir).eos_token_id
    assert ours.eos_token_ids == tuple(expected)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_renders_like_transformers(ours, hf, chat, add_generation_prompt):
    expected = hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(chat, add_generation_prompt) == expected


def test_raise_exception_in_template_raises_template_error_like_transformers(ours, hf):
    chat = [{"role": "tool", "content": "42"}]
    with pytest.raises(jinja2.TemplateError, match="Unknown role: tool"):
        hf.apply_chat_template(chat, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="Unknown role: tool"):
        ours.apply_chat_template(chat)


def test_chat_template_jinja_file_takes_precedence_like_transformers(model_dir, tmp_path):
    path = edited_copy(model_dir, tmp_path / "tok")
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (path / "chat_template.jinja").write_text(template)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert Tokenizer.from_dir(path).apply_chat_template(CHATS[1]) == hf.apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True
    )


def test_missing_chat_template_raises_value_error_naming_the_file(model_dir, tmp_path):
    tokenizer = Tokenizer.from_dir(edited_copy(model_dir, tmp_path / "tok", chat_template=None))
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        tokenizer.apply_chat_template(CHATS[0])


def test_from_dir_without_tokenizer_json_returns_none(checkpoint):
    assert Tokenizer.from_dir(checkpoint("llama", with_tokenizer=False)) is None


@pytest.mark.parametrize("chat", CHATS)
def test_encode_chat_matches_transformers_tokenized_chat(ours, hf, chat):
    expected = hf.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ours.encode_chat(chat) == expected


def test_chat_completion_mask_ids_are_the_tokenized_chat(ours, hf):
    ids, _ = ours.chat_completion_mask(CHATS[2])
    assert ids == hf.apply_chat_template(CHATS[2], tokenize=True, return_dict=False)


def test_chat_completion_mask_covers_exactly_assistant_content_and_end_of_turn(ours):
    ids, mask = ours.chat_completion_mask(CHATS[2])
    masked = ours.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert masked == "Hello! 東京<|end|>2 plus 3 is 5.<|end|>"


def test_chat_completion_mask_equals_transformers_generation_mask(model_dir, tmp_path):
    path = edited_copy(model_dir, tmp_path / "tok", chat_template=GENERATION_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    expected = hf.apply_chat_template(
        CHATS[2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = Tokenizer.from_dir(path).chat_completion_mask(CHATS[2])
    assert (ids, mask) == (expected["input_ids"], expected["assistant_masks"])


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", ["東京 🙂👍🏽 and 🐄 moo", "Ünïcödé ☃ — end"])
def test_incremental_decoder_never_emits_a_broken_character(ours, text):
    ids = ours.encode(text, add_special_tokens=False)
    deltas = stream(ours, ids)
    assert len(ids) > len(text.split())  # multi-byte characters do span several tokens
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_incremental_decoder_flush_releases_an_incomplete_trailing_character(ours):
    first_byte_of_emoji = ours.encode("🙂", add_special_tokens=False)[:1]
    decoder = IncrementalDecoder(ours)
    assert decoder.push(first_byte_of_emoji) == ""
    assert decoder.flush() == ours.decode(first_byte_of_emoji)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_incremental_decoder_deltas_concatenate_to_decode(ours, data):
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=40))
    assert "".join(stream(ours, ids)) == ours.decode(ids)
