"""Fine-tuning data: jsonl validation, tokenisation with loss masks, resumable packed batches.

This module owns the path from a user's ``.jsonl`` file to the fixed-shape integer batches a
train step consumes. Each line is one of three schemas (one schema per file):

- ``{"text": ...}``: loss on every token;
- ``{"prompt": ..., "completion": ...}``: loss on the completion and its EOS only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: OpenAI chat, rendered with the
  checkpoint's chat template by the tokenizer; loss on assistant turns only.

`load_jsonl` validates the whole file before anything trains, so a bad line fails the job at
submission with its file and line number, not hours later. `PackedBatches` packs whole examples
into ``[batch, seq_len]`` rows with per-example `segment_ids` and `positions`, so attention can be
block-diagonal and no target crosses an example boundary; its position in the data is a small
dict, saved with the job's checkpoint, from which it resumes exactly.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

_SCHEMAS: dict[frozenset[str], str] = {
    frozenset({"text"}): "text",
    frozenset({"prompt", "completion"}): "prompt-completion",
    frozenset({"messages"}): "messages",
}
_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A fine-tuning data file or example that cannot be trained on."""


class Tokenizer(Protocol):
    """What data preparation needs from a tokenizer (met by `harli_jax.models.tokenizer`)."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def chat_completion_mask(
        self, messages: Sequence[Mapping[str, str]]
    ) -> tuple[list[int], list[int]]: ...


def load_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate every line of a jsonl data file; blank lines are skipped.

    Raises `DataError` naming the file and line for malformed JSON, a non-object, keys that are
    not exactly one schema, a file mixing schemas, wrong types or empty text.
    """
    path = Path(path)
    examples: list[dict[str, Any]] = []
    file_schema, first_line = "", 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON: {e.msg} at column {e.colno}") from None
            schema = _validate(example, where)
            if not file_schema:
                file_schema, first_line = schema, lineno
            elif schema != file_schema:
                raise DataError(
                    f"{where}: a {schema!r} example, but line {first_line} is {file_schema!r}; "
                    f"a data file holds one schema"
                )
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: holds no examples")
    return examples


def tokenize_example(
    example: Mapping[str, Any], tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask (int32, same length) of one validated example.

    ``mask[i] == 1`` means token ``i`` is a training target, i.e. the loss includes predicting it
    from the tokens before it.
    """
    schema = _schema(example, where="example")
    if schema == "messages":
        ids, mask = tokenizer.chat_completion_mask(example["messages"])
        if len(ids) != len(mask):
            raise DataError(f"chat_completion_mask gave {len(ids)} ids but {len(mask)} mask values")
    else:
        if not tokenizer.eos_token_ids:
            raise DataError("the tokenizer has no EOS token to end training examples with")
        # The primary EOS ends every example, so the model learns to stop generating.
        eos = tokenizer.eos_token_ids[0]
        if schema == "text":
            ids = [*tokenizer.encode(example["text"], add_special_tokens=True), eos]
            mask = [1] * len(ids)
        else:
            prompt = tokenizer.encode(example["prompt"], add_special_tokens=True)
            answer = [*tokenizer.encode(example["completion"], add_special_tokens=False), eos]
            ids = prompt + answer
            mask = [0] * len(prompt) + [1] * len(answer)
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int32)


class PackedBatches:
    """An iterator of packed ``[batch_size, seq_len]`` batches over shuffled epochs.

    Each batch is a dict of int32 arrays: ``tokens``, ``targets`` (the next token of the same
    example), ``loss_mask``, ``segment_ids`` (1, 2, ... per example within a row; 0 is padding)
    and ``positions`` (restarting at 0 for each example). An example of n tokens fills n - 1 slots:
    inputs ``ids[:-1]``, targets ``ids[1:]``. Examples longer than ``seq_len + 1`` tokens are
    truncated; those left with no loss token are dropped with a warning.

    Examples are placed whole, in epoch order, each into the first row with room; a batch ends at
    the first example that fits in none of its rows, and an epoch ends with its last example, so
    every batch is a function of (seed, epoch, cursor). `state` captures that triple and
    `from_state` resumes from it, repeating and skipping nothing. Iteration is endless unless
    `num_epochs` is given.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self._examples = self._prepare(examples, tokenizer)
        self._fingerprint = self._compute_fingerprint()
        self._epoch, self._cursor = 0, 0
        self._order = self._epoch_order(0)

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, int],
        examples: Sequence[Mapping[str, Any]],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ) -> PackedBatches:
        """Resume at `state` (from `state()`); the data and shapes must be the saved run's."""
        batches = cls(
            examples,
            tokenizer,
            batch_size=batch_size,
            seq_len=seq_len,
            seed=int(state["seed"]),
            shuffle=shuffle,
            num_epochs=num_epochs,
        )
        if int(state["fingerprint"]) != batches._fingerprint:
            raise ValueError(
                "data-loader state was saved for different data, batch_size, seq_len or shuffle; "
                "resuming would repeat or skip examples"
            )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < len(batches._examples):
            raise ValueError(f"data-loader state is out of range: epoch {epoch}, cursor {cursor}")
        batches._epoch, batches._cursor = epoch, cursor
        batches._order = batches._epoch_order(epoch)
        return batches

    @property
    def num_examples(self) -> int:
        """Examples per epoch, after dropping those with nothing to learn."""
        return len(self._examples)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def state(self) -> dict[str, int]:
        """Where the next batch starts: JSON-able, for the job checkpoint."""
        return {
            "epoch": self._epoch,
            "cursor": self._cursor,
            "seed": self.seed,
            "fingerprint": self._fingerprint,
        }

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        rows = self._fill_rows(self._cursor)
        self._cursor += sum(len(row) for row in rows)
        if self._cursor == len(self._examples):
            self._epoch, self._cursor = self._epoch + 1, 0
            self._order = self._epoch_order(self._epoch)
        return self._render(rows)

    def _prepare(
        self, examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        kept, dropped = [], []
        for index, example in enumerate(examples):
            try:
                ids, mask = tokenize_example(example, tokenizer)
            except ValueError as e:  # e.g. a chat template that cannot locate assistant turns
                raise DataError(f"example #{index}: {e}") from e
            ids, mask = ids[: self.seq_len + 1], mask[: self.seq_len + 1]
            # mask[0] never counts: the first token has nothing before it to be predicted from.
            if mask[1:].any():
                kept.append((ids, mask))
            else:
                dropped.append(index)
        if dropped:
            logger.warning(
                "dropped %d of %d examples with no loss token within seq_len=%d (first: #%d)",
                len(dropped),
                len(examples),
                self.seq_len,
                dropped[0],
            )
        if not kept:
            raise DataError(f"no example has a loss token within seq_len={self.seq_len}")
        return kept

    def _compute_fingerprint(self) -> int:
        crc = zlib.crc32(np.asarray([self.batch_size, self.seq_len, self.shuffle]).tobytes())
        for ids, mask in self._examples:
            crc = zlib.crc32(mask.tobytes(), zlib.crc32(ids.tobytes(), crc))
        return crc

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._examples))

    def _fill_rows(self, start: int) -> list[list[int]]:
        """First-fit of examples ``order[start:]`` into the rows of one batch, in order."""
        rows: list[list[int]] = [[] for _ in range(self.batch_size)]
        free = [self.seq_len] * self.batch_size
        for index in self._order[start:]:
            slots = len(self._examples[index][0]) - 1
            row = next((r for r in range(self.batch_size) if free[r] >= slots), None)
            if row is None:
                break
            rows[row].append(int(index))
            free[row] -= slots
        return rows

    def _render(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        shape = (self.batch_size, self.seq_len)
        batch = {
            name: np.zeros(shape, np.int32)
            for name in ("tokens", "targets", "loss_mask", "segment_ids", "positions")
        }
        for r, row in enumerate(rows):
            offset = 0
            for segment, index in enumerate(row, start=1):
                ids, mask = self._examples[index]
                span = slice(offset, offset + len(ids) - 1)
                batch["tokens"][r, span] = ids[:-1]
                batch["targets"][r, span] = ids[1:]
                batch["loss_mask"][r, span] = mask[1:]
                batch["segment_ids"][r, span] = segment
                batch["positions"][r, span] = np.arange(len(ids) - 1)
                offset = span.stop
        return batch


def _schema(example: Any, where: str) -> str:
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}")
    schema = _SCHEMAS.get(frozenset(example))
    if schema is None:
        raise DataError(
            f"{where}: keys {sorted(example)} are not one schema; use exactly "
            f'{{"text"}}, {{"prompt", "completion"}} or {{"messages"}}'
        )
    return schema


def _validate(example: Any, where: str) -> str:
    """Check one parsed line against its schema; returns the schema's name."""
    schema = _schema(example, where)
    if schema == "text":
        _check_text(example, "text", where, allow_empty=False)
    elif schema == "prompt-completion":
        _check_text(example, "prompt", where, allow_empty=True)
        _check_text(example, "completion", where, allow_empty=False)
    else:
        _check_messages(example["messages"], where)
    return schema


def _check_text(obj: Mapping[str, Any], key: str, where: str, *, allow_empty: bool) -> None:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {key!r} is empty")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of message objects")
    has_answer = False
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise DataError(f'{at}: expected an object with exactly "role" and "content"')
        if message["role"] not in _ROLES:
            raise DataError(f"{at}: role {message['role']!r} is not one of {list(_ROLES)}")
        _check_text(message, "content", at, allow_empty=message["role"] != "assistant")
        has_answer = has_answer or message["role"] == "assistant"
    if not has_answer:
        raise DataError(f"{where}: 'messages' has no assistant turn to train on")
