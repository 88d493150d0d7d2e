"""Text <-> token ids for HF checkpoints: `tokenizer.json` through the `tokenizers` library.

This module owns everything between user text and token ids, under the Hugging Face conventions
that checkpoints are published with, so ids match `transformers.AutoTokenizer` without importing
it: encoding and decoding, the special-token ids that stop generation, chat templates rendered
exactly as transformers renders them, the assistant-token mask that fine-tuning losses use, and
streaming detokenisation. A checkpoint without `tokenizer.json` has no `Tokenizer`; it is driven by
token ids alone.

Differences from transformers, on purpose: `clean_up_tokenization_spaces` is ignored (transformers
ignores it too for BPE models, i.e. every family here); `tokenizer.json`'s post-processor decides
whether BOS/EOS are added (the `add_bos_token` flags are ignored, as transformers' generic
tokenizer class does); special tokens named in `tokenizer_config.json` but absent from
`tokenizer.json` are not added to the vocabulary.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

# The special-token variables that transformers passes to chat templates.
_TEMPLATE_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of its checkpoint."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] = (),
        source: str = "<memory>",
    ) -> None:
        """`special_tokens` maps names such as "bos_token" to token strings; `eos_token_ids` are
        the stop ids from the model's configs, to which the id of `special_tokens["eos_token"]` is
        added; `source` names the checkpoint in error messages."""
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.source = source
        eos = [*eos_token_ids, self._token_id("eos_token")]
        self._eos_token_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
        self._compiled_template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Loads the tokenizer of an HF checkpoint directory; None when it has no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        special_tokens = {
            name: _token_content(config[name])
            for name in _TEMPLATE_TOKEN_NAMES
            if config.get(name) is not None
        }
        chat_template = _select_template(config.get("chat_template"))
        if (path / "chat_template.jinja").is_file():
            # transformers lets the standalone template file win over the config entry.
            chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        eos_ids = [
            *_as_id_list(_read_json(path / "generation_config.json").get("eos_token_id")),
            *_as_id_list(_read_json(path / "config.json").get("eos_token_id")),
        ]
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=chat_template,
            eos_token_ids=eos_ids,
            source=str(path),
        )

    # -- ids -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (`len(hf_tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: from generation_config.json, config.json, eos_token."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; `add_special_tokens` runs the post-processor (typically prepends BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's template.

        The text already holds whatever special tokens the template writes (often BOS), so encode it
        with `add_special_tokens=False`, as transformers does.
        """
        # transformers drops None-valued keys: templates test for a missing key, not for None.
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return self._template().render(
            messages=plain,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of the rendered chat: the template's own special tokens, no post-processor BOS."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def chat_completion_mask(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], list[int]]:
        """Ids of the whole rendered conversation and a 0/1 mask marking the assistant turns.

        An assistant turn spans what rendering it adds after the generation prompt of the turns
        before it: its content and its end-of-turn token, without trailing whitespace (which the
        model never has to produce). A token belongs to the turn in which it starts.
        """
        full = self.apply_chat_template(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.apply_chat_template(messages[:i], add_generation_prompt=True)
            turn = self.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            if not (turn.startswith(prompt) and full.startswith(turn)):
                raise ValueError(
                    f"the chat template of {self.source} does not render conversations "
                    "incrementally (a prefix of the messages does not render to a prefix of the "
                    "text), so the assistant tokens cannot be located"
                )
            spans.append((len(prompt), len(turn.rstrip())))
        encoding = self.backend.encode(full, add_special_tokens=False)
        mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoding.offsets]
        return encoding.ids, mask

    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError(
                f"{self.source} has no chat template: neither tokenizer_config.json has a "
                "'chat_template' entry nor is there a chat_template.jinja file"
            )
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        return self._compiled_template

    # -- internals ---------------------------------------------------------------------------------

    def _token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)


class IncrementalDecoder:
    """Turns ids arriving one step at a time into text deltas for streaming.

    A delta is held back while the text decoded so far ends in U+FFFD, i.e. inside a multi-byte
    character whose bytes span several tokens. Only a short window of recent ids is re-decoded each
    step (prefix/read offsets, as in TGI and vLLM), so a step costs O(1) in the sequence length.
    The deltas of all `push` calls followed by `flush` concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the window re-decoded for context
        self._read_offset = 0  # ids before this have been emitted as text

    def push(self, ids: int | Iterable[int]) -> str:
        """Appends `ids` (one id or several) and returns the text they complete, possibly ""."""
        self.ids.extend([int(ids)] if isinstance(ids, numbers.Integral) else map(int, ids))
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Returns the text still held back (e.g. a trailing incomplete character) at stream end."""
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


# -- chat templates, as transformers compiles them -------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}`, which transformers uses to mark assistant
    text; the body renders unchanged (the assistant mask comes from prefix rendering instead)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates must not do.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# -- config files ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: str | Mapping[str, Any]) -> str:
    # Older configs store special tokens as serialized AddedToken dicts.
    return value if isinstance(value, str) else value["content"]


def _select_template(value: str | list[dict[str, str]] | None) -> str | None:
    # A list holds named templates; "default" is the one transformers uses for plain chat.
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value}.get("default")
    return value


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
