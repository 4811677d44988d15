"""Training data: reading, schema detection, chat-format ids and the loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaforge.chat import ChatFormatError
from llamaforge.finetune.data import (
    IGNORE_INDEX,
    DataError,
    detect_schema,
    encode_chat,
    encode_record,
    read_records,
)
from llamaforge.tokenizer import Tokenizer

DIALOG = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "And 日本 🦙?"},
    {"role": "assistant", "content": " Café, naïve 🎉 "},
]


@pytest.fixture(scope="module", params=["model", "json"])
def tokenizer(request, tiny_tokenizer_path: Path, tmp_path_factory) -> Tokenizer:
    if request.param == "model":
        return Tokenizer(tiny_tokenizer_path)
    from test_tokenizer import hf_tokenizer_json

    return Tokenizer(hf_tokenizer_json(tiny_tokenizer_path, tmp_path_factory.mktemp("json")))


def meta_training_ids(tokenizer: Tokenizer, dialog: list[dict]) -> list[int]:
    """Meta's chat format for finished exchanges, transcribed independently of chat.py."""
    turns = list(dialog)
    if turns[0]["role"] == "system":
        merged = "<<SYS>>\n" + turns[0]["content"] + "\n<</SYS>>\n\n" + turns[1]["content"]
        turns = [{"role": "user", "content": merged}] + turns[2:]
    ids: list[int] = []
    for user, answer in zip(turns[::2], turns[1::2], strict=True):
        ids += tokenizer.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ",
                                bos=True, eos=True)
    return ids


def test_ids_are_the_chat_format(tokenizer: Tokenizer) -> None:
    assert encode_chat(tokenizer, DIALOG).input_ids == meta_training_ids(tokenizer, DIALOG)


def test_loss_only_on_answers_and_their_eos(tokenizer: Tokenizer) -> None:
    example = encode_chat(tokenizer, DIALOG)
    assert len(example.labels) == len(example.input_ids)
    # Split into exchanges at BOS; in each, the labelled tokens decode to the answer, ending in EOS.
    starts = [i for i, t in enumerate(example.input_ids) if t == tokenizer.bos_id] + [len(example.input_ids)]
    answers = ["Two plus two is four.", "Café, naïve 🎉"]
    for (start, end), answer in zip(zip(starts, starts[1:], strict=False), answers, strict=True):
        labels = example.labels[start:end]
        labelled = [t for t in labels if t != IGNORE_INDEX]
        assert labelled[-1] == tokenizer.eos_id
        assert tokenizer.decode(labelled[:-1]).strip() == answer
        # Everything labelled comes after everything unlabelled: the question carries no loss.
        first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
        assert all(t == IGNORE_INDEX for t in labels[:first]) and IGNORE_INDEX not in labels[first:]
        assert labels[first:] == example.input_ids[start + first:end]


def test_schemas(tiny_tokenizer_path: Path) -> None:
    tokenizer = Tokenizer(tiny_tokenizer_path)
    dolly = {"instruction": "Summarise.", "context": "Llamas hum.", "response": "They hum.", "category": "x"}
    alpaca = {"instruction": "Summarise.", "input": "Llamas hum.", "output": "They hum."}
    assert [detect_schema(r) for r in (dolly, alpaca, {"messages": DIALOG}, {"text": "t"})] == [
        "dolly", "alpaca", "chat", "text"]
    expected = encode_chat(tokenizer, [{"role": "user", "content": "Summarise.\n\nLlamas hum."},
                                       {"role": "assistant", "content": "They hum."}])
    assert encode_record(tokenizer, dolly) == expected == encode_record(tokenizer, alpaca)
    text = encode_record(tokenizer, {"text": "Once upon a time"})
    assert text.input_ids == tokenizer.encode("Once upon a time", bos=True, eos=True)
    assert text.labels == [IGNORE_INDEX] + text.input_ids[1:]
    with pytest.raises(DataError, match=r"cannot tell the schema .*\['prompt'\]"):
        detect_schema({"prompt": "x"})


def test_read_formats(tmp_path: Path) -> None:
    rows = [{"instruction": "a", "context": "", "response": "b"}, {"instruction": "c", "context": "d", "response": "e"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("instruction,context,response\na,,b\nc,d,e\n")
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert read_records(tmp_path / name) == rows


def test_bad_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl line 2 is not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        read_records(tmp_path / "d.txt")


def test_training_dialogs_must_end_with_the_answer(tiny_tokenizer_path: Path) -> None:
    with pytest.raises(ChatFormatError, match="must have role 'assistant': a training example ends with the answer"):
        encode_chat(Tokenizer(tiny_tokenizer_path), DIALOG[:-1])
