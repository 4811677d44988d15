"""Task rows in the public datasets' own schemas: local JSONL / Parquet files, or the hub through `datasets`.

Layout of `--data-dir DIR` (one folder per dataset, one file per split, as the hub publishes them):

    DIR/arc_challenge/{train,test}.jsonl      allenai/ai2_arc, config ARC-Challenge
    DIR/hellaswag/{train,validation}.jsonl    Rowan/hellaswag
    DIR/mmlu/SUBJECT/{dev,test}.jsonl         cais/mmlu, one folder per subject (57)
    DIR/truthfulqa/validation.jsonl           truthfulqa/truthful_qa, config multiple_choice
    DIR/winogrande/{train,validation}.jsonl   allenai/winogrande, config winogrande_xl
    DIR/gsm8k/{train,test}.jsonl              openai/gsm8k, config main
    DIR/demo/test.jsonl                       the demo model's held-out problems (shipped with it)

Each split may instead be `SPLIT.parquet` or the hub's shards `SPLIT-00000-of-0000N.parquet`, so a
config folder downloaded from the hub (e.g. cais/mmlu's `abstract_algebra/`) can be used as it is.
A dataset shipped with the package (the demo's) is read from the package when DIR lacks its folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamaforge.checkpoint.hub import offline_when_unreachable
from llamaforge.errors import LlamaforgeError

SPLIT_FILES = ("{split}.jsonl", "{split}.parquet", "{split}-*.parquet")


class EvalDataError(LlamaforgeError):
    """Task data that is missing, unreadable or not in its dataset's schema."""


@dataclass(frozen=True)
class Dataset:
    """Where a task's rows live, and the columns its prompts read (dotted for nested fields)."""

    folder: str  # under --data-dir
    hub: str | None  # the hub id lm-eval loads; None for data only the package has
    config: str | None  # the hub config (dataset_name)
    columns: tuple[str, ...]
    bundled: Path | None = None  # the eval split's file in the package, used when --data-dir lacks `folder`

    def describe(self) -> str:
        if self.hub is None:
            return f"llamaforge's {self.folder} data"
        return self.hub + (f" ({self.config})" if self.config else "")


class DataSource:
    """Rows of a dataset split: from files under `data_dir`, or (without one) from the hub through `datasets`."""

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise EvalDataError(f"--data-dir {self.data_dir} is not a directory")

    def rows(self, dataset: Dataset, split: str) -> list[dict]:
        """The split's rows in file order, each checked to hold the dataset's columns."""
        if dataset.bundled is not None and (self.data_dir is None or not (self.data_dir / dataset.folder).is_dir()):
            if not dataset.bundled.is_file():
                raise EvalDataError(f"{dataset.bundled} is missing from this install; reinstall llamaforge, or pass "
                                    f"--data-dir with a {dataset.folder}/ folder")
            rows, where = read_rows(dataset.bundled), str(dataset.bundled)
        elif self.data_dir is None:
            rows, where = _hub_rows(dataset, split), f"{dataset.describe()} split {split}"
        else:
            path = self.split_path(dataset, split)
            rows, where = read_rows(path), str(path)
        if not rows:
            raise EvalDataError(f"{where} holds no rows")
        check_columns(rows, dataset, where)
        return rows

    def split_path(self, dataset: Dataset, split: str) -> Path:
        """The local file of a split; the error names every path looked for."""
        folder = self.data_dir / dataset.folder
        tried = []
        for pattern in SPLIT_FILES:
            name = pattern.format(split=split)
            found = sorted(folder.glob(name))
            if found:
                return found[0] if len(found) == 1 else folder / name
            tried.append(str(folder / name))
        raise EvalDataError(f"no {split} split of {dataset.describe()}: looked for {', '.join(tried)} "
                            "(see docs/eval.md for the layout)")


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl file, a .parquet file, or every Parquet shard a `SPLIT-*.parquet` pattern matches."""
    if "*" in path.name:
        return [row for shard in sorted(path.parent.glob(path.name)) for row in read_rows(shard)]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise EvalDataError(f"reading {path} needs pyarrow: pip install 'llamaforge[eval]'") from None
        try:
            return parquet.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise EvalDataError(f"{path} is not a readable Parquet file ({exc})") from None
    return _jsonl_rows(path)


def _jsonl_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file; each line is decoded on its own, so an invalid byte is named by its line."""
    rows, offset = [], 0
    for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EvalDataError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                                f"{offset + exc.start})") from None
        offset += len(raw)
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
    return rows


def check_columns(rows: list[dict], dataset: Dataset, where: str) -> None:
    """Raise naming the first column (or nested field) a row lacks."""
    for number, row in enumerate(rows, 1):
        for column in dataset.columns:
            value = row
            for part in column.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise EvalDataError(f"{where}: row {number} has no column '{column}'; {dataset.describe()} rows "
                                        f"have {', '.join(dataset.columns)}")
                value = value[part]


def _hub_rows(dataset: Dataset, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise EvalDataError("loading tasks from the hub needs `datasets`: pip install 'llamaforge[eval]', "
                            "or pass --data-dir with local files") from None
    with offline_when_unreachable() as online:
        try:
            return [dict(row) for row in datasets.load_dataset(dataset.hub, dataset.config, split=split)]
        except Exception as exc:  # datasets raises many types: offline, not found, gated, bad split
            where = "from the hub" if online else "from the datasets cache (offline, or the hub cannot be reached)"
            raise EvalDataError(f"could not load {dataset.describe()} split {split} {where} ({exc}); "
                                "offline, pass --data-dir with local files (see docs/eval.md)") from None
