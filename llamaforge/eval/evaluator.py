"""`prepare` every task's prompts from its data (before any model loads), then `evaluate` them with a model.

The report's numbers are lm-evaluation-harness's: per task the mean of each metric over documents with
its standard error, per group (mmlu and its four categories) the size-weighted mean over its subjects
with the pooled standard error, and also the plain mean over the subjects (`acc_macro`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llamaforge.api import LLM
from llamaforge.errors import TokenizerError
from llamaforge.eval.data import DataSource, EvalDataError
from llamaforge.eval.fewshot import FEWSHOT_SEED, FewshotSampler, fewshot_prefix
from llamaforge.eval.metrics import mean, mean_stderr, pooled_stderr, unweighted_stderr, weighted_mean
from llamaforge.eval.scoring import batch_size_named_on_oom, generate_until, loglikelihoods, tokenize_request
from llamaforge.eval.tasks import GROUPS, Task, leaves, make_task


@dataclass
class TaskRun:
    """One task's documents and the requests they make: (context, continuation) pairs, or generation prompts."""

    task: Task
    num_fewshot: int
    docs: list[dict]
    requests: list[list[tuple[str, str]]] = field(default_factory=list)
    prompts: list[str | list[dict]] = field(default_factory=list)  # text, or a dialog's messages


def prepare(names: list[str], source: DataSource, num_fewshot: int | None = None,
            limit: int | None = None) -> list[TaskRun]:
    """Read each task's rows and build its prompts with lm-eval's few-shot examples.

    `num_fewshot` overrides every task's count except TruthfulQA's, which lm-eval keeps at 0.
    `limit` keeps the first N documents of each task (each MMLU subject).
    """
    runs = []
    for name in dict.fromkeys(leaf for requested in names for leaf in leaves(requested)):
        task = make_task(name)
        shots = task.num_fewshot if num_fewshot is None or task.num_fewshot == 0 else num_fewshot
        rows = [row for row in source.rows(task.dataset, task.eval_split) if task.keep(row)]
        if not rows:
            raise EvalDataError(f"{name}: the {task.eval_split} split of {task.dataset.describe()} has none "
                                "of its rows")
        docs = _prepared(task, rows[:limit], task.eval_split)
        sampler = None
        if shots:
            pool = _prepared(task, source.rows(task.dataset, task.fewshot_split), task.fewshot_split)
            needed = shots + task.exclude_doc
            if len(pool) < needed:
                raise EvalDataError(f"{name}: {shots}-shot needs {needed} rows in the {task.fewshot_split} split of "
                                    f"{task.dataset.describe()}; it has {len(pool)}")
            sampler = FewshotSampler(pool, task.first_n, task.exclude_doc)
        run = TaskRun(task, shots, docs)
        for doc in docs:
            prefix = fewshot_prefix(task, sampler.sample(shots, doc)) if sampler else task.description()
            if task.kind == "generate":
                run.prompts.append(task.prompt(doc, prefix))
            else:
                run.requests.append(task.requests(doc, prefix))
        runs.append(run)
    return runs


def _prepared(task: Task, rows: list[dict], split: str) -> list[dict]:
    """Rows as the task's prompts read them; a row whose values do not fit the schema is named."""
    docs = []
    for number, row in enumerate(rows, 1):
        try:
            doc = task.prepare(row)
            task.example(doc)  # reads every field a prompt or score needs
        except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
            raise EvalDataError(f"{task.name}: row {number} of the {split} split does not fit the "
                                f"{task.dataset.describe()} schema ({type(exc).__name__}: {exc})") from None
        docs.append(doc)
    return docs


def evaluate(llm: LLM, runs: list[TaskRun], batch_size: int = 8, progress: bool = True) -> dict:
    """Score every task; the report holds each task's and group's metrics with standard errors."""
    if llm.tokenizer is None:
        raise TokenizerError(f"{llm.source or 'the model'} has no tokenizer; evaluation reads text: "
                             "pass --tokenizer tokenizer.model")
    started = time.perf_counter()
    scored = [run for run in runs if run.task.kind == "loglikelihood"]
    groups = [[tokenize_request(llm.tokenizer, context, continuation, llm.config.context_length)
               for context, continuation in doc_requests] for run in scored for doc_requests in run.requests]
    with batch_size_named_on_oom(llm.device, batch_size, "documents"):
        results = iter(loglikelihoods(llm.model, groups, batch_size, progress))
        per_doc = {run.task.name: [run.task.score(doc, next(results)) for doc in run.docs] for run in scored}
        for run in (run for run in runs if run.task.kind == "generate"):
            texts = generate_until(llm, run.prompts, run.task.until, run.task.max_new_tokens, batch_size, progress)
            per_doc[run.task.name] = [run.task.score(doc, [text]) for doc, text in zip(run.docs, texts, strict=True)]
    report = {run.task.name: _task_metrics(per_doc[run.task.name]) | {"num_fewshot": run.num_fewshot} for run in runs}
    for group in GROUPS:
        members = [name for name in leaves(group) if name in report]
        if len(members) == len(leaves(group)):
            report[group] = _group_metrics([report[name] for name in members])
    return {"results": report, "groups": {g: GROUPS[g] for g in GROUPS if g in report},
            "seconds": time.perf_counter() - started}


def _task_metrics(scores: list[dict[str, float]]) -> dict:
    metrics: dict = {}
    for metric in scores[0]:
        values = [score[metric] for score in scores]
        metrics[metric] = mean(values)
        metrics[f"{metric}_stderr"] = mean_stderr(values)
    return metrics | {"samples": len(scores)}


def _group_metrics(members: list[dict]) -> dict:
    """lm-eval 0.4's size-weighted score, and as `_macro` the plain mean over the members (MMLU's 57 subjects),
    which is how the Open LLM Leaderboard (v1) averaged MMLU."""
    sizes = [m["samples"] for m in members]
    metrics: dict = {}
    for metric in (k for k in members[0] if k not in ("samples", "num_fewshot") and not k.endswith("_stderr")):
        values, stderrs = [m[metric] for m in members], [m[f"{metric}_stderr"] for m in members]
        metrics[metric] = weighted_mean(values, sizes)
        metrics[f"{metric}_stderr"] = pooled_stderr(stderrs, sizes)
        metrics[f"{metric}_macro"] = mean(values)
        metrics[f"{metric}_macro_stderr"] = unweighted_stderr(stderrs)
    return metrics | {"samples": sum(sizes), "num_fewshot": members[0]["num_fewshot"]}


def run_config(source: DataSource, num_fewshot: int | None, limit: int | None, batch_size: int) -> dict:
    """What a report records about how it was made."""
    return {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
            "fewshot_seed": FEWSHOT_SEED, "data": str(source.data_dir) if source.data_dir else "hub"}
