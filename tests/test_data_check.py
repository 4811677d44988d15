"""`llamaforge data check`: problems with their lines, token statistics, the rendered loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaforge.finetune.data import DataError, encode_record
from llamaforge.finetune.inspect import BOS_TEXT, EOS_TEXT, LOSS_END, LOSS_START, check_data, render_loss_mask
from llamaforge.tokenizer import Tokenizer

DOLLY = [
    {"instruction": "What is two plus two?", "context": "", "response": "Four."},
    {"instruction": "Name a colour.", "context": "The sky is blue.", "response": "Blue, like the sky."},
    {"instruction": "Say hello in Japanese.", "context": "", "response": "こんにちは 日本 🦙"},
    {"instruction": "Write a long answer about llamas and why they hum at night.", "context": "",
     "response": "Llamas hum to keep in touch with the herd, and mothers hum to their young. " * 3},
    {"instruction": "Spell café.", "context": "", "response": "C-a-f-é, naïve too."},
]
CHAT = {"messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "What is 2+2?"},
                     {"role": "assistant", "content": "Four."},
                     {"role": "user", "content": "And 日本?"},
                     {"role": "assistant", "content": "Japan 🎉"}]}


@pytest.fixture(scope="module", params=["model", "json"])
def tokenizer(request, tiny_tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tiny SentencePiece model, and the same vocabulary as a tokenizer.json: their decodes differ in code."""
    if request.param == "model":
        return Tokenizer(tiny_tokenizer_path)
    from test_tokenizer import hf_tokenizer_json

    return Tokenizer(hf_tokenizer_json(tiny_tokenizer_path, tmp_path_factory.mktemp("json")))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n"
                            for row in rows), encoding="utf-8")
    return path


def unmarked(text: str) -> str:
    for marker in (LOSS_START, LOSS_END, BOS_TEXT, EOS_TEXT):
        text = text.replace(marker, "")
    return text


def marked_runs(text: str) -> list[str]:
    return [part.split(LOSS_END)[0] for part in text.split(LOSS_START)[1:]]


def test_clean_dolly_file(tokenizer: Tokenizer, tmp_path: Path) -> None:
    lengths = [len(encode_record(tokenizer, row).input_ids) for row in DOLLY]
    seq_len = sorted(lengths)[2]  # the two longest examples are over it
    report = check_data(str(write_jsonl(tmp_path / "dolly.jsonl", DOLLY)), tokenizer, seq_len=seq_len)
    data = report.to_dict()
    assert report.ok and data["problems"] == []
    assert data["records"] == 5 and data["schemas"] == {"dolly": 5} and not data["mixed_schemas"]
    assert [size.tokens for size in report.sizes] == lengths
    tokens = data["tokens"]
    assert (tokens["count"], tokens["min"], tokens["max"]) == (5, min(lengths), max(lengths))
    assert tokens["median"] == sorted(lengths)[2] and tokens["p95"] == max(lengths)
    assert tokens["mean"] == pytest.approx(sum(lengths) / 5)
    assert sum(b["count"] for b in tokens["histogram"]) == 5
    assert tokens["histogram"][0]["from"] == min(lengths) and tokens["histogram"][-1]["to"] >= max(lengths)
    assert 1 <= len(tokens["histogram"]) <= 10
    over = [f"line {i}" for i, n in enumerate(lengths, start=1) if n > seq_len]
    assert data["longer_than_seq_len"]["count"] == len(over) == 2
    assert [item["where"] for item in data["longer_than_seq_len"]["first"]] == over
    text = report.render()
    assert "schemas: dolly 5" in text and "mixed" not in text and "result: OK" in text
    assert all(where in text for where in over)


def test_every_problem_is_listed_with_its_line(tokenizer: Tokenizer, tmp_path: Path) -> None:
    bad_chat = {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]}
    rows = [DOLLY[0], DOLLY[1],
            {"instruction": "No answer field.", "context": ""},  # line 3: missing field
            DOLLY[2],
            {"instruction": "Wrong type.", "context": "", "response": 5},  # line 5
            {"instruction": "Empty answer.", "context": "", "response": "  "},  # line 6
            bad_chat,  # line 7
            CHAT]
    report = check_data(str(write_jsonl(tmp_path / "bad.jsonl", rows)), tokenizer)
    assert not report.ok
    problems = {problem.where: problem.message for problem in report.problems}
    assert list(problems) == ["line 3", "line 5", "line 6", "line 7"]
    assert problems["line 3"].startswith("missing field 'response' (the record looks like dolly")
    assert "'response' must be a string, not int" in problems["line 5"]
    assert "'response' is empty" in problems["line 6"]
    assert "role 'user'" in problems["line 7"] or "role 'assistant'" in problems["line 7"]
    # The good records are still measured, each by its own line.
    assert [size.where for size in report.sizes] == ["line 1", "line 2", "line 4", "line 8"]
    assert report.to_dict()["schemas"] == {"chat": 2, "dolly": 5}
    text = report.render()
    assert all(f"{where}: {message}" in text for where, message in problems.items())
    assert "result: 4 unusable records" in text


def test_render_lists_twenty_problems_and_counts_the_rest(tokenizer: Tokenizer, tmp_path: Path) -> None:
    rows = [DOLLY[0]] + [{"instruction": "x", "context": "", "response": ""}] * 25
    report = check_data(str(write_jsonl(tmp_path / "many.jsonl", rows)), tokenizer)
    assert len(report.problems) == 25 and len(report.to_dict()["problems"]) == 25
    text = report.render()
    assert "line 21:" in text and "line 22:" not in text and "... and 5 more" in text


def test_first_example_marks_the_answer_and_eos(tokenizer: Tokenizer, tmp_path: Path) -> None:
    row = DOLLY[2]  # multi-byte characters in the answer
    report = check_data(str(write_jsonl(tmp_path / "one.jsonl", [row])), tokenizer)
    shown = report.first_example.text
    ids = encode_record(tokenizer, row).input_ids
    assert shown.startswith(BOS_TEXT + "[INST] Say hello") and shown.endswith(EOS_TEXT + LOSS_END)
    assert unmarked(shown) == tokenizer.decode(ids)
    # The loss covers the answer with the space before it (in its first token), Meta's trailing space, EOS.
    assert marked_runs(shown) == [f" {row['response']} {EOS_TEXT}"]


def test_loss_mask_of_a_chat_marks_each_answer(tokenizer: Tokenizer) -> None:
    example = encode_record(tokenizer, CHAT)
    shown = render_loss_mask(tokenizer, example)
    assert marked_runs(shown) == [f" Four. {EOS_TEXT}", f" Japan 🎉 {EOS_TEXT}"]
    # Each exchange is encoded on its own after its BOS, so it is decoded on its own too.
    exchanges = [part for part in shown.split(BOS_TEXT) if part]
    assert len(exchanges) == 2 and exchanges[1].startswith("[INST] And 日本? [/INST]")
    bos_starts = [i for i, token in enumerate(example.input_ids) if token == tokenizer.bos_id]
    segments = [example.input_ids[a:b] for a, b in zip(bos_starts, bos_starts[1:] + [None], strict=True)]
    assert [unmarked(part) for part in exchanges] == [tokenizer.decode(ids) for ids in segments]


def test_plain_text_carries_loss_after_bos(tokenizer: Tokenizer) -> None:
    example = encode_record(tokenizer, {"text": "Llamas hum."})
    assert render_loss_mask(tokenizer, example) == f"{BOS_TEXT}{LOSS_START}Llamas hum.{EOS_TEXT}{LOSS_END}"


def test_to_dict_round_trips_through_json(tokenizer: Tokenizer, tmp_path: Path) -> None:
    rows = [*DOLLY, {"instruction": "x", "context": "", "response": ""}, {"unknown": 1}]
    report = check_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer, seq_len=16)
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is False and data["first_example"]["where"] == "line 1"


def test_mixed_schemas_are_reported(tokenizer: Tokenizer, tmp_path: Path) -> None:
    rows = [DOLLY[0], CHAT, {"instruction": "Add.", "input": "2 and 2", "output": "4"}, DOLLY[1]]
    report = check_data(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), tokenizer)
    assert report.ok
    assert report.to_dict()["schemas"] == {"chat": 1, "dolly": 2, "alpaca": 1}
    assert report.to_dict()["mixed_schemas"] is True
    assert "schemas: chat 1, dolly 2, alpaca 1 (mixed" in report.render()


def test_no_usable_examples(tokenizer: Tokenizer, tmp_path: Path) -> None:
    report = check_data(str(write_jsonl(tmp_path / "none.jsonl", [{"text": ""}, {"what": "?"}])), tokenizer)
    assert not report.ok and report.sizes == [] and report.first_example is None
    assert report.to_dict()["tokens"] is None
    assert "no usable examples" in report.render()


def test_empty_file_raises(tokenizer: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        check_data(str(tmp_path / "empty.jsonl"), tokenizer)


def test_invalid_utf8_is_named_not_a_crash(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(DOLLY[0]).encode() + b"\n" + json.dumps(DOLLY[1]).encode() + b"\n"
                     + b'{"instruction": "caf\xe9", "context": "", "response": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 3 is not valid UTF-8: byte 0xe9 at offset \d+"):
        check_data(str(path), tokenizer)
