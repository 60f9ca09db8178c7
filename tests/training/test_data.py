"""JSONL shapes, exact label masking, error messages, deterministic validation split."""

from __future__ import annotations

import pytest

from lorafold.training.data.jsonl import (IGNORE, DataFormatError, collate, encode_row, load_splits, read_jsonl,
                                          split_rows)
from tests.training.helpers import smol_tokenizer, toy_rows, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return smol_tokenizer()


def test_prompt_completion_masks_exactly_the_prompt(tok, tmp_path):
    row = read_jsonl(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Review: fine film\nSentiment:",
                                                         "completion": " positive", "subject": "x"}]))[0]
    ex = encode_row(row, tok, max_length=64)
    prompt = tok("Review: fine film\nSentiment:", add_special_tokens=True)["input_ids"]
    completion = tok(" positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == prompt + completion
    assert ex.labels == [IGNORE] * len(prompt) + completion
    assert ex.prompt_len == len(prompt) and ex.target == " positive"
    assert row.meta == {"subject": "x"}


def test_messages_loss_on_assistant_turns_only(tok, tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    ex = encode_row(read_jsonl(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))[0], tok, 512)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    learned = tok.decode([t for t in ex.labels if t != IGNORE])
    assert "Hello there" in learned and "Goodbye" in learned
    assert "Hi" not in learned and "Bye" not in learned and "user" not in learned
    # the masked prefix tokenizes exactly like the inference prompt (chat_prompt_ids)
    from lorafold.server.models.chat import chat_prompt_ids

    assert ex.input_ids[: ex.prompt_len] == chat_prompt_ids(tok, msgs[:1])


def test_text_rows_learn_every_token_and_truncate(tok, tmp_path):
    ex = encode_row(read_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "one two three four five six"}]))[0],
                    tok, max_length=3)
    assert len(ex.input_ids) == 3 and ex.labels == ex.input_ids


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "a"}', "'completion' must be a string"),
    ('{"prompt": 3, "completion": "b"}', "'prompt' must be a string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0]"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"input": "x"}', "no known field"),
    ('{"text": "ok"', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_lines_name_line_and_field(tmp_path, line, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", line])
    with pytest.raises(DataFormatError) as err:
        read_jsonl(path)
    assert "bad.jsonl:3:" in str(err.value) and needle in str(err.value)


def test_validation_split_is_deterministic_and_disjoint(tok, tmp_path):
    rows = read_jsonl(write_jsonl(tmp_path / "d.jsonl", toy_rows(40)))
    a_train, a_val = split_rows(rows, 0.25, seed=7)
    b_train, b_val = split_rows(rows, 0.25, seed=7)
    _, c_val = split_rows(rows, 0.25, seed=8)
    assert [r.line for r in a_val] == [r.line for r in b_val] and len(a_val) == 10
    assert {r.line for r in a_val}.isdisjoint(r.line for r in a_train) and len(a_train) == 30
    assert [r.line for r in c_val] != [r.line for r in a_val]
    train, val = load_splits(tmp_path / "d.jsonl", tok, 64, val_path=tmp_path / "d.jsonl")
    assert len(train) == len(val) == 40


def test_collate_pads_and_masks(tok, tmp_path):
    train, _ = load_splits(write_jsonl(tmp_path / "d.jsonl", toy_rows(4)), tok, 64, val_fraction=0.0)
    batch = collate(train[:2] + [train[0].__class__([1, 2], [IGNORE, 2], 1)], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][2].tolist()[:2] == [1, 1] and batch["labels"][2, 2:].eq(IGNORE).all()
