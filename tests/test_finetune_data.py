"""Training data: reading, schema detection, chat-format ids and the loss mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamaforge.chat import ChatFormatError
from llamaforge.finetune.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    Record,
    collate,
    detect_schema,
    encode_chat,
    encode_record,
    encode_records,
    load_records,
    pack_examples,
    read_records,
    split_examples,
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
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        assert [record.data for record in read_records(tmp_path / name)] == rows
    assert [record.where for record in read_records(tmp_path / "d.csv")] == ["line 2", "line 3"]


def test_dataset_directory_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that is not a file goes to `datasets.load_dataset` (a hub id or a dataset folder), offline here."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [record.data for record in load_records(tmp_path / "repo")] == rows
    # A hub id that is not cached, offline (set before `datasets` is imported, as a user would).
    code = "from llamaforge.finetune.data import load_records; load_records('no-such-user/no-such-dataset')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")})
    assert result.returncode != 0
    assert "DataError: cannot load dataset no-such-user/no-such-dataset split 'train' (offline" in result.stderr
    # Not offline by the environment, but the hub does not answer: the same error, without ~25 s of retries.
    from factories import free_port

    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")} | {
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "h")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "DataError: cannot load dataset no-such-user/no-such-dataset split 'train' (offline" in result.stderr
    assert "Retrying" not in result.stderr


def test_bad_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line is not valid JSON \(line 2: Expecting value\)$"):
        read_records(tmp_path / "bad.jsonl")
    lines = ['{"text": "ok"}', "not json", '{"text": "ok"}', "{", *["x"] * 12]  # 14 bad lines, all named
    (tmp_path / "many.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"many.jsonl: 14 lines are not valid JSON \(line 2: Expecting value; "
                                        r"line 4: Expecting property name .*; line 5: .*; and 4 more\)$"):
        read_records(tmp_path / "many.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        read_records(tmp_path / "d.txt")


def test_training_dialogs_must_end_with_the_answer(tiny_tokenizer_path: Path) -> None:
    with pytest.raises(ChatFormatError, match="must have role 'assistant': a training example ends with the answer"):
        encode_chat(Tokenizer(tiny_tokenizer_path), DIALOG[:-1])


def test_bad_records_are_reported_with_their_lines(tiny_tokenizer_path: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer(tiny_tokenizer_path)
    lines = [
        {"instruction": "fine", "response": "ok"},
        {"instruction": "no answer"},
        {"instruction": 3, "response": "x"},
        {"instruction": "empty", "response": "  "},
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]},
        {"messages": "hello"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(DataError) as error:
        encode_records(tokenizer, read_records(tmp_path / "d.jsonl"), seq_len=64)
    message = str(error.value)
    assert "line 1" not in message
    assert "line 2: missing field 'response' (the record looks like dolly" in message
    assert "line 3: field 'instruction' must be a string, not int" in message
    assert "line 4: field 'response' is empty" in message
    assert "line 5: message 0 has role 'assistant' where 'user' was expected" in message
    assert "line 6: 'messages' must be a list" in message
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl holds no records"):
        read_records(tmp_path / "empty.jsonl")


def test_long_records_truncate_drop_or_fail(tiny_tokenizer_path: Path) -> None:
    tokenizer = Tokenizer(tiny_tokenizer_path)
    records = [Record("line 1", {"text": "short"}), Record("line 2", {"text": "a long text " * 20})]
    kept, notes = encode_records(tokenizer, records, seq_len=16, on_long="truncate")
    assert [len(e.input_ids) for e in kept][1] == 16 and notes == [notes[0]] and "line 2" in notes[0]
    kept, notes = encode_records(tokenizer, records, seq_len=16, on_long="drop")
    assert len(kept) == 1 and "dropped" in notes[0]
    with pytest.raises(DataError, match="line 2: .* longer than --seq-len 16"):
        encode_records(tokenizer, records, seq_len=16, on_long="error")


def test_packing_keeps_examples_whole_and_labels_aligned() -> None:
    examples = [Example([1] + [10 + i] * i, [IGNORE_INDEX] + [10 + i] * i) for i in range(8)]
    rows = pack_examples(examples, seq_len=8)
    assert all(len(row.input_ids) <= 8 for row in rows)
    assert sum((row.input_ids for row in rows), []) == sum((e.input_ids for e in examples), [])
    for row in rows:  # positions restart at 0 exactly where an example starts
        starts = [i for i, p in enumerate(row.positions) if p == 0]
        assert all(row.input_ids[i] == 1 and row.labels[i] == IGNORE_INDEX for i in starts)
    batch = collate(rows[:2])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["positions"].shape
    assert (batch["labels"][batch["input_ids"] == 0] == IGNORE_INDEX).all()


def test_split_is_deterministic_and_disjoint() -> None:
    items = list(range(100))
    train, val = split_examples(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_examples(items, 0.1, seed=3) == (train, val)
    assert split_examples(items, 0.1, seed=4)[1] != val
    assert split_examples(items[:3], 0.01, seed=0)[1]  # a small file still gets one validation example


GOOD_LINES = [json.dumps({"instruction": "a", "response": "b"}).encode(), json.dumps({"text": "é"}).encode()]
BAD_LINE = b'{"instruction": "caf\xe9", "response": "b"}'  # Latin-1 "é": not UTF-8


def invalid_utf8_jsonl(path: Path) -> tuple[Path, int]:
    """A JSONL file whose line 3 holds a Latin-1 byte, and that byte's offset in the file."""
    path.write_bytes(b"\n".join([*GOOD_LINES, BAD_LINE, GOOD_LINES[0]]) + b"\n")
    return path, sum(len(line) + 1 for line in GOOD_LINES) + BAD_LINE.index(b"\xe9")


def test_invalid_utf8_names_its_line_and_offset(tmp_path: Path) -> None:
    path, offset = invalid_utf8_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=rf"bad.jsonl line 3 is not valid UTF-8: byte 0xe9 at offset {offset}\b"):
        read_records(path)
    documents = {"bad.json": (b'[\n  {"text": "ok"},\n  {"text": "caf\xe9"}\n]\n', 3),
                 "bad.csv": (b'instruction,response\na,b\n"multi\nline",b\ncaf\xe9,b\n', 5)}
    for name, (content, line) in documents.items():
        (tmp_path / name).write_bytes(content)
        offset = content.index(b"\xe9")
        with pytest.raises(DataError, match=rf"{name} line {line} is not valid UTF-8: byte 0xe9 at offset {offset}\b"):
            read_records(tmp_path / name)


def test_lines_split_only_at_line_breaks(tmp_path: Path) -> None:
    """U+2028 inside a JSON string is text, not a line break (str.splitlines would split there)."""
    rows = [{"text": "one\u2028two"}, {"text": "three\r"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                                      encoding="utf-8", newline="")
    assert [(record.where, record.data) for record in read_records(tmp_path / "d.jsonl")] == [
        ("line 1", rows[0]), ("line 2", rows[1])]


@pytest.mark.parametrize("command", [["data", "check"], ["finetune", "--out", "run", "--data"]])
def test_cli_names_the_line_of_an_invalid_byte(command: list[str], tmp_path: Path) -> None:
    path, offset = invalid_utf8_jsonl(tmp_path / "bad.jsonl")
    result = subprocess.run([sys.executable, "-m", "llamaforge", *command, str(path)], capture_output=True,
                            text=True, cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path} line 3 is not valid UTF-8: byte 0xe9 at offset {offset}; save the file as UTF-8"]


def test_eval_rows_name_an_invalid_byte(tmp_path: Path) -> None:
    """The evaluator's task reader (llamaforge.eval.data) is byte-safe the same way."""
    from llamaforge.eval.data import EvalDataError, read_rows

    path, offset = invalid_utf8_jsonl(tmp_path / "test.jsonl")
    with pytest.raises(EvalDataError, match=rf"test.jsonl:3: not valid UTF-8 \(byte 0xe9 at offset {offset}\)"):
        read_rows(path)
