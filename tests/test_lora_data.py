"""Specification of fine-tuning data: jsonl validation, loss masks, packing, shuffling, resume."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from harli_jax.lora.data import DataError, PackedBatches, load_jsonl, tokenize_example

BOS, EOS, END_OF_TURN, OFFSET = 1, 2, 3, 4


class ByteTokenizer:
    """Byte-level stand-in for harli_jax.models.tokenizer: byte b is token b + OFFSET."""

    bos_token_id = BOS
    eos_token_ids = (EOS,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + OFFSET for b in text.encode()]
        return [BOS, *ids] if add_special_tokens else ids

    def chat_completion_mask(self, messages):
        """Template "<role>: content<END_OF_TURN>"; loss on assistant content and its end."""
        ids, mask = [BOS], [0]
        for m in messages:
            header = self.encode(f"{m['role']}: ", add_special_tokens=False)
            body = [*self.encode(m["content"], add_special_tokens=False), END_OF_TURN]
            ids += header + body
            mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
        return ids, mask


TOK = ByteTokenizer()


def write_jsonl(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_text_example_trains_on_every_token_and_ends_with_eos():
    ids, mask = tokenize_example({"text": "hi"}, TOK)
    assert ids.tolist() == [BOS, ord("h") + OFFSET, ord("i") + OFFSET, EOS]
    assert mask.tolist() == [1, 1, 1, 1]
    assert ids.dtype == mask.dtype == np.int32


def test_prompt_completion_trains_only_on_the_completion_and_eos():
    ids, mask = tokenize_example({"prompt": "Q", "completion": "ab"}, TOK)
    assert ids.tolist() == [BOS, ord("Q") + OFFSET, ord("a") + OFFSET, ord("b") + OFFSET, EOS]
    assert mask.tolist() == [0, 0, 1, 1, 1]


def test_chat_example_uses_the_chat_template_mask():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    ids, mask = tokenize_example({"messages": messages}, TOK)
    expected_ids, expected_mask = TOK.chat_completion_mask(messages)
    assert ids.tolist() == expected_ids
    assert mask.tolist() == expected_mask
    assert ids[mask == 1].tolist() == [ord("A") + OFFSET, END_OF_TURN]


@pytest.mark.parametrize(
    "line",
    [
        '{"text": "one"}',
        '{"prompt": "", "completion": "two"}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
    ],
)
def test_load_jsonl_accepts_each_schema_and_skips_blank_lines(tmp_path, line):
    path = write_jsonl(tmp_path, [line, "", "  ", line])
    assert load_jsonl(path) == [json.loads(line)] * 2


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"text": "x"', "malformed JSON"),
        ('["text", "x"]', "expected a JSON object"),
        ('{"txt": "x"}', "not one schema"),
        ('{"text": "x", "prompt": "p", "completion": "c"}', "not one schema"),
        ('{"text": "   "}', "'text' is empty"),
        ('{"text": 5}', "'text' must be a string"),
        ('{"prompt": "p", "completion": ""}', "'completion' is empty"),
        ('{"prompt": ["p"], "completion": "c"}', "'prompt' must be a string"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "q"}]}', r"messages\[0\]: role 'bot'"),
        ('{"messages": [{"role": "assistant", "content": 1}]}', r"messages\[0\]: 'content'"),
        ('{"prompt": "p", "completion": "c"}', "line 1 is 'text'; a data file holds one schema"),
    ],
)
def test_load_jsonl_names_file_and_line_of_a_bad_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path, ['{"text": "fine"}', "", bad, '{"text": "fine"}'])
    with pytest.raises(DataError, match=rf"{path}:3: .*{reason}"):
        load_jsonl(path)


def test_load_jsonl_refuses_an_empty_file(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(write_jsonl(tmp_path, [""]))


def prompt_completion_examples(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"prompt": f"p{i}" + "x" * int(rng.integers(0, 6)), "completion": f"c{i}" * (1 + i % 3)}
        for i in range(n)
    ]


def packed(examples, **kwargs) -> PackedBatches:
    return PackedBatches(examples, TOK, **({"batch_size": 3, "seq_len": 24} | kwargs))


def segments(batch) -> list[tuple[list[int], list[int]]]:
    """Each packed example as (full token ids, loss mask of its targets)."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        for s in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
            sel = batch["segment_ids"][r] == s
            tokens, targets = batch["tokens"][r, sel], batch["targets"][r, sel]
            ids = tokens.tolist() + targets[-1:].tolist()
            out.append((ids, batch["loss_mask"][r, sel].tolist()))
    return out


def test_packed_targets_are_next_tokens_within_one_example():
    examples = prompt_completion_examples(30)
    batch = next(packed(examples))

    for r in range(3):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        for t in np.flatnonzero(seg):
            start = t - pos[t]
            assert np.all(seg[start : t + 1] == seg[t])  # a segment is contiguous from position 0
            if t + 1 < seg.size and seg[t + 1] == seg[t]:
                assert batch["targets"][r, t] == batch["tokens"][r, t + 1]
        assert not batch["loss_mask"][r][seg == 0].any()  # padding carries no loss


def test_one_epoch_packs_every_example_once_with_its_shifted_mask():
    examples = prompt_completion_examples(30)
    batches = packed(examples, num_epochs=1)

    got = Counter((tuple(ids), tuple(mask)) for batch in batches for ids, mask in segments(batch))

    expected = Counter()
    for example in examples:
        ids, mask = tokenize_example(example, TOK)
        expected[(tuple(ids.tolist()), tuple(mask[1:].tolist()))] += 1
    assert got == expected
    assert batches.epoch == 1


def test_batches_have_fixed_shape_and_int32_fields():
    batch = next(packed(prompt_completion_examples(10)))
    assert set(batch) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
    for value in batch.values():
        assert value.shape == (3, 24) and value.dtype == np.int32


def all_segments(batches) -> list[list[int]]:
    return [ids for batch in batches for ids, _ in segments(batch)]


def test_shuffle_is_reproducible_per_seed_and_differs_between_epochs():
    examples = prompt_completion_examples(30)

    run = all_segments(packed(examples, seed=7, num_epochs=2))

    assert run == all_segments(packed(examples, seed=7, num_epochs=2))
    assert run != all_segments(packed(examples, seed=8, num_epochs=2))
    epoch0, epoch1 = run[: len(examples)], run[len(examples) :]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_resume_from_state_continues_exactly(stop_after):
    examples = prompt_completion_examples(30)
    reference = list(itertools.islice(packed(examples, seed=3), 16))

    interrupted = packed(examples, seed=3)
    head = list(itertools.islice(interrupted, stop_after))
    state = json.loads(json.dumps(interrupted.state()))  # survives a JSON checkpoint
    resumed = PackedBatches.from_state(state, examples, TOK, batch_size=3, seq_len=24)
    tail = list(itertools.islice(resumed, 16 - stop_after))

    for want, got in zip(reference, head + tail, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_resume_refuses_state_of_different_data():
    examples = prompt_completion_examples(30)
    state = packed(examples).state()
    with pytest.raises(ValueError, match="different data"):
        PackedBatches.from_state(state, examples[:-1], TOK, batch_size=3, seq_len=24)


def test_long_examples_are_truncated_and_lossless_ones_dropped():
    long_text = {"text": "y" * 100}
    long_prompt = {"prompt": "z" * 100, "completion": "never reached"}
    batches = packed([long_text, long_prompt, {"text": "ok"}], seq_len=16, num_epochs=1)

    assert batches.num_examples == 2
    kept = all_segments(batches)
    assert sorted(len(ids) for ids in kept) == [4, 17]  # "ok" whole; the text cut to seq_len + 1
