"""Evaluation reports: the results JSON, a Markdown table, and two reports compared (deltas and a bar chart)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llamaforge.errors import LlamaforgeError

NOT_METRICS = ("samples", "num_fewshot")


def table_rows(report: dict) -> Iterator[tuple[str, str]]:
    """(label, result key) in table order: each requested task, a group's members indented under it
    (mmlu's four categories; a category's subjects when the category itself was asked for)."""
    groups = report.get("groups", {})
    for name in report["tasks"]:
        yield name, name
        for member in groups.get(name, []):
            yield f"  {member}", member


def metrics_of(result: dict) -> list[str]:
    return [key for key in result if key not in NOT_METRICS and not key.endswith("_stderr")]


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def markdown(report: dict) -> str:
    """The results as a Markdown table, values in percent."""
    lines = ["| Task | Shots | Metric | Value (%) | ± Stderr | Samples |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    for label, key in table_rows(report):
        result = report["results"][key]
        for metric in metrics_of(result):
            lines.append(f"| {label} | {result['num_fewshot']} | {metric} | {percent(result[metric])} | "
                         f"{percent(result.get(f'{metric}_stderr'))} | {result['samples']} |")
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> Path:
    """Write the report as JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_report(path: str | Path) -> dict:
    """A report written by `llamaforge eval --out`; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LlamaforgeError(f"results file {path} does not exist")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LlamaforgeError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(report, dict) or not {"tasks", "results"} <= report.keys():
        raise LlamaforgeError(f"{path} is not a report of `llamaforge eval --out` (it lacks 'tasks' and 'results')")
    return report


@dataclass
class Delta:
    """One metric of one task in both reports."""

    label: str
    metric: str
    a: float
    b: float

    @property
    def delta(self) -> float:
        return self.b - self.a


def compare(a: dict, b: dict) -> list[Delta]:
    """Every (task, metric) both reports hold, in the first report's table order."""
    deltas = []
    for label, key in table_rows(a):
        if key in b["results"]:
            first, second = a["results"][key], b["results"][key]
            deltas.extend(Delta(label, metric, first[metric], second[metric]) for metric in metrics_of(first)
                          if metric in second)
    if not deltas:
        raise LlamaforgeError("the two reports share no task and metric to compare")
    return deltas


def compare_markdown(deltas: list[Delta], name_a: str, name_b: str) -> str:
    """The comparison as a Markdown table: both values and the change, in percentage points."""
    lines = [f"| Task | Metric | {name_a} (%) | {name_b} (%) | Δ (points) |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {d.label} | {d.metric} | {percent(d.a)} | {percent(d.b)} | {100 * d.delta:+.2f} |" for d in deltas]
    return "\n".join(lines)


def plot_comparison(deltas: list[Delta], name_a: str, name_b: str, path: str | Path) -> Path:
    """A bar chart of both reports' values, one pair of bars per task and metric."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlamaforgeError("the comparison chart needs matplotlib: pip install 'llamaforge[eval]'") from None
    # Horizontal bars, one pair per row of the comparison table, top to bottom: long task names stay readable.
    labels = [f"{d.label.strip()} {d.metric}" for d in deltas]
    positions = range(len(deltas))
    height = 0.4
    figure, axes = plt.subplots(figsize=(8, 1.5 + 0.45 * len(deltas)), layout="constrained")
    axes.barh([p - height / 2 for p in positions], [100 * d.a for d in deltas], height, label=name_a)
    axes.barh([p + height / 2 for p in positions], [100 * d.b for d in deltas], height, label=name_b)
    axes.set_yticks(list(positions), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("score (%)")
    axes.set_title(f"{name_b} vs {name_a}")
    figure.legend(loc="outside lower center", ncols=2)  # below the axes: inside, it covered the longest bars
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
