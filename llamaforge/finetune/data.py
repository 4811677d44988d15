"""Training data: read instruction, chat and plain-text files; format them exactly as the chat format
of `llamaforge.chat` does; put the loss on the assistant's tokens (and its EOS) only.

Schemas, detected from a record's fields: chat (`messages` with roles), Dolly (`instruction`,
`context`, `response`), Alpaca (`instruction`, `input`, `output`), plain text (`text`, for continued
pre-training: every token carries loss).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from llamaforge.chat import dialog_segments
from llamaforge.errors import LlamaforgeError
from llamaforge.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of tokens without loss (PyTorch's cross_entropy default ignore_index)
SCHEMA_FIELDS = {
    "chat": ("messages",),
    "dolly": ("instruction", "response"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


class DataError(LlamaforgeError):
    """A training file or record that cannot be used, named with its line."""


@dataclass
class Example:
    """One tokenized training example: labels equal input_ids where there is loss, else IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]


def read_records(path: str | Path) -> list[dict]:
    """Records of a .jsonl, .json (a list of objects), .csv or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a list of records")
        return data
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        return parquet.read_table(path).to_pylist()
    raise DataError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .csv or .parquet")


def detect_schema(record: dict) -> str:
    """Which of SCHEMA_FIELDS a record follows."""
    for schema, fields in SCHEMA_FIELDS.items():
        if isinstance(record, dict) and all(field in record for field in fields):
            return schema
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"cannot tell the schema of a record with fields {keys}; expected one of: "
        + "; ".join(f"{name} ({', '.join(fields)})" for name, fields in SCHEMA_FIELDS.items())
    )


def to_messages(record: dict, schema: str) -> list[dict]:
    """A chat, Dolly or Alpaca record as a dialog ending in the assistant's answer."""
    if schema == "chat":
        return list(record["messages"])
    instruction = str(record["instruction"] or "").strip()
    extra = str(record.get("context" if schema == "dolly" else "input") or "").strip()
    answer = record["response" if schema == "dolly" else "output"]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(answer or "")}]


def encode_chat(tokenizer: Tokenizer, messages: list[dict]) -> Example:
    """Token ids of a finished dialog in the chat format; loss only on each answer and its EOS."""
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in dialog_segments(messages, answered=True):
        input_ids.append(tokenizer.bos_id)
        labels.append(IGNORE_INDEX)
        for token_id, start, _ in tokenizer.encode_with_offsets(segment.text):
            input_ids.append(token_id)
            labels.append(token_id if start >= segment.answer_start else IGNORE_INDEX)
        input_ids.append(tokenizer.eos_id)
        labels.append(tokenizer.eos_id)  # the model must learn to stop
    return Example(input_ids, labels)


def encode_text(tokenizer: Tokenizer, text: str) -> Example:
    """Plain text for continued pre-training: BOS + text + EOS, loss on everything after BOS."""
    ids = tokenizer.encode(text, bos=True, eos=True)
    return Example(ids, [IGNORE_INDEX] + ids[1:])


def encode_record(tokenizer: Tokenizer, record: dict, schema: str | None = None) -> Example:
    """One record of any schema as a training example."""
    schema = schema or detect_schema(record)
    if schema == "text":
        return encode_text(tokenizer, str(record["text"]))
    return encode_chat(tokenizer, to_messages(record, schema))
