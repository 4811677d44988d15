"""Training data: read instruction, chat and plain-text files; format them exactly as the chat format
of `llamaforge.chat` does; put the loss on the assistant's tokens (and its EOS) only.

Schemas, detected from a record's fields: chat (`messages` with roles), Dolly (`instruction`,
`context`, `response`), Alpaca (`instruction`, `input`, `output`), plain text (`text`, for continued
pre-training: every token carries loss).

Packing puts several short examples in one `seq_len` row with positions restarting at 0 for each;
`Llama.forward` turns restarting positions into a block-diagonal causal mask, so examples never attend
to each other, and each example's BOS carries no label, so none is trained to predict the next one.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaforge.chat import dialog_segments, validate_dialog
from llamaforge.checkpoint.hub import offline_when_unreachable
from llamaforge.errors import ChatFormatError, LlamaforgeError
from llamaforge.finetune.config import ON_LONG
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


@dataclass
class Record:
    """A record with where it came from ("line 12", "row 3"), for messages that point at it."""

    where: str
    data: dict


def read_records(path: str | Path) -> list[Record]:
    """Records of a .jsonl, .json (a list of objects), .csv or .parquet file, each with its line or row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records, bad = [], []
        for number, line in enumerate(read_lines(path), start=1):
            if line.strip():
                try:
                    records.append(Record(f"line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    bad.append((number, exc.msg))
        if bad:  # all of them at once: a file is fixed in one pass, not one error at a time
            listed = "; ".join(f"line {number}: {message}" for number, message in bad[:MAX_LISTED])
            more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            lines = "line is" if len(bad) == 1 else f"{len(bad)} lines are"
            raise DataError(f"{path}: {lines} not valid JSON ({listed}{more})")
        return _nonempty(records, path)
    if suffix == ".json":
        try:
            data = json.loads("".join(read_lines(path)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a list of records")
        return _nonempty([Record(f"record {i}", item) for i, item in enumerate(data, start=1)], path)
    if suffix == ".csv":
        # Line 1 is the header; this counts rows, which equals lines unless a field spans several.
        rows = csv.DictReader(read_lines(path))
        return _nonempty([Record(f"line {i}", row) for i, row in enumerate(rows, start=2)], path)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        rows = parquet.read_table(path).to_pylist()
        return _nonempty([Record(f"row {i}", row) for i, row in enumerate(rows, start=1)], path)
    raise DataError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .csv or .parquet")


MAX_LISTED = 10  # bad lines named in one error


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file with their line ends; DataError names the line and offset of an invalid byte."""
    # Bytes split at \n, \r\n and \r only; str.splitlines would also split inside a JSON string holding U+2028.
    lines, offset = [], 0
    for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset "
                            f"{offset + exc.start}; save the file as UTF-8") from None
        offset += len(raw)
    return lines


def _nonempty(records: list[Record], path: Path) -> list[Record]:
    if not records:
        raise DataError(f"{path} holds no records; it is empty")
    return records


def load_records(source: str | Path, split: str = "train") -> list[Record]:
    """Records of a local file, or of a dataset directory or hub id through the `datasets` library."""
    path = Path(source).expanduser()
    if path.is_file():
        return read_records(path)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        raise DataError(f"data file {path} does not exist")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source} is not a file; reading a hub dataset needs the datasets library: "
                        "pip install 'llamaforge[train]'") from None
    with offline_when_unreachable() as online:
        try:
            dataset = datasets.load_dataset(str(source), split=split)
        except Exception as exc:  # datasets raises many types: not found, offline, gated, bad split
            offline = "" if online else " (offline, or the hub cannot be reached, and it is not in the datasets cache)"
            raise DataError(f"cannot load dataset {source} split {split!r}{offline}: {exc}") from None
    return _nonempty([Record(f"row {i}", row) for i, row in enumerate(dataset, start=1)], Path(str(source)))


def detect_schema(record: dict) -> str:
    """Which of SCHEMA_FIELDS a record follows."""
    for schema, fields in SCHEMA_FIELDS.items():
        if isinstance(record, dict) and all(field in record for field in fields):
            return schema
    if isinstance(record, dict):
        # Name the missing field of the schema the record comes closest to (a Dolly row without `response`).
        present = {name: sum(f in record for f in fields) for name, fields in SCHEMA_FIELDS.items()}
        closest = max(present, key=present.get)
        if present[closest]:
            missing = [f for f in SCHEMA_FIELDS[closest] if f not in record]
            raise DataError(f"missing field {', '.join(repr(f) for f in missing)} (the record looks like {closest}: "
                            f"{', '.join(SCHEMA_FIELDS[closest])})")
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"cannot tell the schema of a record with fields {keys}; expected one of: "
        + "; ".join(f"{name} ({', '.join(fields)})" for name, fields in SCHEMA_FIELDS.items())
    )


def check_record(record: dict, schema: str) -> None:
    """Raise DataError naming the field of a record that is missing, of the wrong type, or empty."""
    missing = [name for name in SCHEMA_FIELDS[schema] if name not in record]
    if missing:
        raise DataError(f"missing field {', '.join(missing)} (this file is {schema}: "
                        f"{', '.join(SCHEMA_FIELDS[schema])})")
    if schema == "chat":
        if not isinstance(record["messages"], list):
            raise DataError(f"'messages' must be a list of {{role, content}} objects, "
                            f"not {type(record['messages']).__name__}")
        try:
            validate_dialog(record["messages"], answered=True)
        except ChatFormatError as exc:
            raise DataError(str(exc)) from None
        return
    optional = {"dolly": ("context",), "alpaca": ("input",), "text": ()}[schema]
    for name in SCHEMA_FIELDS[schema] + optional:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise DataError(f"field {name!r} must be a string, not {type(value).__name__}")
        if name in SCHEMA_FIELDS[schema] and not (value or "").strip():
            raise DataError(f"field {name!r} is empty")


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


def prepare_record(tokenizer: Tokenizer, record: Record, schema: str | None = None) -> Example:
    """Check one record (its schema detected unless given) and encode it; DataError names what is wrong."""
    schema = schema or detect_schema(record.data)
    check_record(record.data, schema)
    return encode_record(tokenizer, record.data, schema)


def encode_records(tokenizer: Tokenizer, records: Iterable[Record], seq_len: int,
                   on_long: str = "truncate") -> tuple[list[Example], list[str]]:
    """Check and encode every record; returns the examples and notes on the ones truncated or dropped.

    Raises one DataError listing the first problems (with their lines) if any record is unusable.
    """
    if on_long not in ON_LONG:
        raise DataError(f"on_long must be one of {', '.join(ON_LONG)}, not {on_long!r}")
    examples, notes, problems = [], [], []
    for record in records:
        try:
            example = prepare_record(tokenizer, record)
        except DataError as exc:
            problems.append(f"{record.where}: {exc}")
            continue
        if len(example.input_ids) > seq_len:
            message = f"{record.where}: {len(example.input_ids)} tokens, longer than --seq-len {seq_len}"
            if on_long == "error":
                problems.append(message + " (use --on-long truncate or drop, or raise --seq-len)")
                continue
            notes.append(message + ("; truncated" if on_long == "truncate" else "; dropped"))
            if on_long == "drop":
                continue
            example = Example(example.input_ids[:seq_len], example.labels[:seq_len])
        examples.append(example)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError("unusable training records:\n  " + "\n  ".join(problems[:5]) + more
                        + "\nrun `llamaforge data check FILE` for a full report")
    return examples, notes


def split_examples(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic (train, validation) split: the same seed and data give the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    n_val = validation_size(len(items), val_fraction)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:n_val])
    chosen = set(val)
    return [item for i, item in enumerate(items) if i not in chosen], [items[i] for i in val]


def validation_size(n_items: int, val_fraction: float) -> int:
    """How many of n items split_examples holds out: the fraction, rounded, and at least one when there are two."""
    n_val = round(n_items * val_fraction)
    return max(n_val, 1) if val_fraction > 0 and n_items >= 2 else n_val


@dataclass
class Row:
    """One training row: ids, labels and positions (restarting at 0 for each packed example)."""

    input_ids: list[int]
    labels: list[int]
    positions: list[int]

    @property
    def n_labels(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def pack_examples(examples: list[Example], seq_len: int) -> list[Row]:
    """Greedily fill rows of at most seq_len tokens with whole examples, in order."""
    rows: list[Row] = []
    current = Row([], [], [])
    for example in examples:
        if current.input_ids and len(current.input_ids) + len(example.input_ids) > seq_len:
            rows.append(current)
            current = Row([], [], [])
        current.input_ids += example.input_ids
        current.labels += example.labels
        current.positions += list(range(len(example.input_ids)))
    if current.input_ids:
        rows.append(current)
    return rows


def unpacked_rows(examples: list[Example]) -> list[Row]:
    """One example per row."""
    return [Row(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]


def collate(rows: list[Row], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest into tensors (B, T); padding has no label and its own positions."""
    length = max(len(row.input_ids) for row in rows)
    input_ids, labels, positions = [], [], []
    for row in rows:
        pad = length - len(row.input_ids)
        input_ids.append(row.input_ids + [pad_id] * pad)
        labels.append(row.labels + [IGNORE_INDEX] * pad)
        positions.append(row.positions + list(range(pad)))  # a segment of its own: nothing attends to it
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
            "positions": torch.tensor(positions)}
