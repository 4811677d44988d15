"""`llamaforge data check`: lint a training file before a run.

Every record goes through the same step as training (`prepare_record` of `llamaforge.finetune.data`),
so the problems found here are exactly the records training would refuse; unlike training, the check
collects all of them instead of stopping. The report adds the token lengths of the usable examples,
the ones longer than `seq_len`, and the first example with the tokens that carry loss marked, to
check the loss mask by eye.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import groupby

from llamaforge.finetune.data import (
    IGNORE_INDEX,
    SCHEMA_FIELDS,
    DataError,
    Example,
    detect_schema,
    load_records,
    prepare_record,
)
from llamaforge.finetune.preference import encode_pair, is_pair, pair_of
from llamaforge.tokenizer import Tokenizer

LOSS_START, LOSS_END = "[[", "]]"  # around each run of tokens that carry loss
BOS_TEXT, EOS_TEXT = "<s>", "</s>"
SHOWN_PROBLEMS = 20  # render() lists this many problems; to_dict() has them all
SHOWN_LONG = 5  # locations of examples longer than seq_len, in both render() and to_dict()
HISTOGRAM_BINS, BAR_WIDTH = 10, 40


@dataclass
class Problem:
    """An unusable record: where it is and why."""

    where: str
    message: str


@dataclass
class ExampleSize:
    """Length of one usable example: all its tokens, and the ones that carry loss."""

    where: str
    tokens: int
    labelled: int


@dataclass
class ShownExample:
    """One example as text, with the loss mask marked."""

    where: str
    schema: str
    text: str


@dataclass
class DataReport:
    """What `llamaforge data check` found in a training file."""

    source: str
    seq_len: int
    records: int
    schemas: dict[str, int]  # records per detected schema; records of no schema are in problems
    problems: list[Problem]
    sizes: list[ExampleSize]  # usable examples, in file order
    first_example: ShownExample | None

    @property
    def ok(self) -> bool:
        """True when training can use every record."""
        return not self.problems

    @property
    def long(self) -> list[ExampleSize]:
        """Usable examples longer than seq_len: `--on-long` truncates or drops them."""
        return [size for size in self.sizes if size.tokens > self.seq_len]

    def to_dict(self) -> dict:
        """The report as JSON-serialisable data, for `--json`."""
        lengths = [size.tokens for size in self.sizes]
        tokens = None
        if lengths:
            tokens = token_stats(lengths) | {
                "labelled": sum(size.labelled for size in self.sizes),
                "histogram": [{"from": low, "to": high, "count": count} for low, high, count in histogram(lengths)],
            }
        return {
            "source": self.source,
            "ok": self.ok,
            "records": self.records,
            "schemas": self.schemas,
            "mixed_schemas": len(self.schemas) > 1,
            "problems": [asdict(problem) for problem in self.problems],
            "usable": len(self.sizes),
            "tokens": tokens,
            "seq_len": self.seq_len,
            "longer_than_seq_len": {
                "count": len(self.long),
                "first": [{"where": size.where, "tokens": size.tokens} for size in self.long[:SHOWN_LONG]],
            },
            "first_example": asdict(self.first_example) if self.first_example else None,
        }

    def render(self) -> str:
        """The report as text for a terminal."""
        lines = [f"source: {self.source}", f"records: {self.records}", self._render_schemas()]
        lines += self._render_problems() + self._render_lengths() + self._render_long()
        if self.first_example:
            shown = self.first_example
            lines += [f"first usable example ({shown.where}, {shown.schema}); loss on the tokens in "
                      f"{LOSS_START} {LOSS_END}:", shown.text]
        lines.append("result: OK" if self.ok else
                     f"result: {_count(len(self.problems), 'unusable record')}; training refuses this file")
        return "\n".join(lines)

    def _render_schemas(self) -> str:
        counts = ", ".join(f"{schema} {count}" for schema, count in self.schemas.items()) or "none"
        unknown = self.records - sum(self.schemas.values())
        mixed = " (mixed: the file holds more than one schema)" if len(self.schemas) > 1 else ""
        return f"schemas: {counts}{mixed}" + (f"; {_count(unknown, 'record')} of no known schema" if unknown else "")

    def _render_problems(self) -> list[str]:
        if not self.problems:
            return ["problems: none"]
        lines = [f"problems: {_count(len(self.problems), 'unusable record')}"]
        lines += [f"  {problem.where}: {problem.message}" for problem in self.problems[:SHOWN_PROBLEMS]]
        if len(self.problems) > SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - SHOWN_PROBLEMS} more")
        return lines

    def _render_lengths(self) -> list[str]:
        if not self.sizes:
            return ["tokens: no usable examples"]
        lengths = [size.tokens for size in self.sizes]
        stats = token_stats(lengths)
        lines = [f"tokens of {_count(stats['count'], 'usable example')}: min {stats['min']}, "
                 f"mean {stats['mean']:.1f}, median {stats['median']:g}, p95 {stats['p95']}, max {stats['max']}",
                 f"labelled tokens (carrying loss): {sum(size.labelled for size in self.sizes)}"]
        return lines + render_histogram(histogram(lengths))

    def _render_long(self) -> list[str]:
        long = self.long
        if not long:
            return [f"longer than seq_len {self.seq_len}: none"]
        shown = ", ".join(f"{size.where} ({size.tokens} tokens)" for size in long[:SHOWN_LONG])
        more = ", ..." if len(long) > SHOWN_LONG else ""
        return [f"longer than seq_len {self.seq_len}: {_count(len(long), 'example')}, truncated or dropped "
                f"as --on-long says: {shown}{more}"]


def check_data(source: str, tokenizer: Tokenizer, seq_len: int = 2048) -> DataReport:
    """Check every record of a training file or dataset as training would, collecting all problems."""
    records = load_records(source)
    schemas: Counter[str] = Counter()
    problems, sizes = [], []
    first_example = None
    for record in records:
        try:
            schema = "preference" if is_pair(record.data) else detect_schema(record.data)
            schemas[schema] += 1
            example, size = prepare_record_sized(tokenizer, record, schema)
        except DataError as exc:
            problems.append(Problem(record.where, str(exc)))
            continue
        sizes.append(size)
        if first_example is None:
            first_example = ShownExample(record.where, schema, render_loss_mask(tokenizer, example))
    ordered = {schema: schemas[schema] for schema in (*SCHEMA_FIELDS, "preference") if schemas[schema]}
    return DataReport(str(source), seq_len, len(records), ordered, problems, sizes, first_example)


def prepare_record_sized(tokenizer: Tokenizer, record, schema: str) -> tuple[Example, ExampleSize]:
    """A record as training encodes it, and its size. A preference pair is shown as its chosen answer after the
    prompt; its size is the prompt and its longer answer (one row of `--objective dpo`), its labelled tokens both
    answers'."""
    if schema != "preference":
        example = prepare_record(tokenizer, record, schema)
        labelled = sum(label != IGNORE_INDEX for label in example.labels)
        return example, ExampleSize(record.where, len(example.input_ids), labelled)
    pair = encode_pair(tokenizer, pair_of(record.data))
    example = Example(pair.prompt_ids + pair.chosen_ids, [IGNORE_INDEX] * len(pair.prompt_ids) + pair.chosen_ids)
    longest = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
    return example, ExampleSize(record.where, longest, len(pair.chosen_ids) + len(pair.rejected_ids))


def token_stats(lengths: list[int]) -> dict:
    """Count, min, mean, median, p95 (nearest rank) and max of a non-empty list of token counts."""
    ordered = sorted(lengths)
    # Nearest rank: the p95 is a length some example really has, and needs no interpolation rule.
    p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]
    return {"count": len(ordered), "min": ordered[0], "mean": statistics.fmean(ordered),
            "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """(first, last, count) of at most `bins` equal ranges of whole token counts covering the lengths."""
    low, high = min(lengths), max(lengths)
    width = math.ceil((high - low + 1) / bins)
    counts = Counter((length - low) // width for length in lengths)
    n_bins = (high - low) // width + 1
    return [(low + i * width, low + (i + 1) * width - 1, counts[i]) for i in range(n_bins)]


def render_histogram(bins: list[tuple[int, int, int]]) -> list[str]:
    """One line per bin: its token range, its count, and a bar of '#' scaled to the fullest bin."""
    labels = [f"{first}" if first == last else f"{first}-{last}" for first, last, _ in bins]
    label_width = max(len(label) for label in labels)
    count_width = max(len(str(count)) for _, _, count in bins)
    fullest = max(count for _, _, count in bins)
    lines = []
    for label, (_, _, count) in zip(labels, bins, strict=True):
        bar = "#" * max(round(BAR_WIDTH * count / fullest), 1 if count else 0)  # a non-empty bin shows
        lines.append(f"  {label:>{label_width}} {count:>{count_width}} {bar}".rstrip())
    return lines


def render_loss_mask(tokenizer: Tokenizer, example: Example) -> str:
    """The example as text, BOS/EOS as <s>/</s>, each maximal run of loss-carrying tokens in [[ ]]."""
    pieces: list[tuple[str, bool]] = []  # (text, carries loss)
    span: list[tuple[int, bool]] = []  # text tokens since the last BOS/EOS
    for token_id, label in zip(example.input_ids, example.labels, strict=True):
        if token_id in (tokenizer.bos_id, tokenizer.eos_id):
            pieces += _decode_span(tokenizer, span)
            span = []
            pieces.append((BOS_TEXT if token_id == tokenizer.bos_id else EOS_TEXT, label != IGNORE_INDEX))
        else:
            span.append((token_id, label != IGNORE_INDEX))
    pieces += _decode_span(tokenizer, span)
    marked = []
    for labelled, run in groupby((piece for piece in pieces if piece[0]), key=lambda piece: piece[1]):
        text = "".join(piece_text for piece_text, _ in run)
        marked.append(LOSS_START + text + LOSS_END if labelled else text)
    return "".join(marked)


def _decode_span(tokenizer: Tokenizer, span: list[tuple[int, bool]]) -> list[tuple[str, bool]]:
    """Text of each run of equally labelled tokens in a span between control tokens.

    Each span is decoded as one text, as it was encoded: each exchange of a chat is encoded on its
    own, with SentencePiece's dummy prefix, so its leading space is dropped, as in Meta's rendering.
    Decoding a run alone would also drop the leading space of a run that starts with '▁' (an answer
    does), so a run's text is the difference between the decodes of the span up to its end and up to
    its start. That is exact because labels change only between characters (encode_chat labels by
    character offset), so a decoded prefix never ends inside a multi-byte character.
    """
    ids = [token_id for token_id, _ in span]
    pieces, start, decoded_before = [], 0, ""
    for labelled, run in groupby(span, key=lambda token: token[1]):
        start += len(list(run))
        decoded = tokenizer.decode(ids[:start])
        pieces.append((decoded[len(decoded_before):], labelled))
        decoded_before = decoded
    return pieces


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
