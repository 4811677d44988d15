"""Benchmark evaluation: the same tasks on the same weights, llamaforge against lm-evaluation-harness's HF backend.

Both sides read the same task files and score the same prompts (lm-eval runs its own task definitions,
pointed at the files), one task at a time, and their scores must agree (to 1e-6 in fp32). Per task:

- requests s: seconds answering the model requests (log-likelihoods and generations), lm-eval's measured
  around its HF backend's `loglikelihood` / `generate_until`, llamaforge's around `evaluate`;
- CPU s: the same in CPU seconds of the process, which other load on a shared machine disturbs far less.

The gain differs by task (a long few-shot prefix shared by four choices saves most; MMLU's one-token
choices, which lm-eval already runs once, save least), so besides the sum over the run the ratio is also
given for the leaderboard's mix: each task's time per document times its number of documents in the real
test sets. By default a random 41M-parameter model with the Llama 2 tokenizer (from ../shared/assets when
present) scores small generated task files, which a laptop CPU runs in minutes; point it at a real model
and the real data for the real numbers:

    python benchmarks/eval.py                                         # CPU, random model, generated files
    python benchmarks/eval.py --model meta-llama/Llama-2-7b-hf --data-dir DIR --limit 100 --dtype bfloat16 \\
        --device cuda --batch-size 32
    python benchmarks/eval.py --preset tiny --docs 2 --tasks arc_challenge,gsm8k --json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import (  # noqa: E402
    LEADERBOARD_SHOTS,
    SHARED_ASSETS,
    random_model,
    run_lm_eval,
    train_tokenizer,
    write_eval_data,
    write_hf_dir,
)

import llamaforge  # noqa: E402
from llamaforge.checkpoint import resolve  # noqa: E402
from llamaforge.config import ModelArgs  # noqa: E402
from llamaforge.eval.data import DataSource  # noqa: E402
from llamaforge.eval.evaluator import evaluate, prepare  # noqa: E402
from llamaforge.eval.tasks import MMLU_CATEGORY  # noqa: E402

LLAMA2_TOKENIZER = SHARED_ASSETS / "llama2-tokenizer" / "tokenizer.model"
PRESETS = {
    # 41M parameters, 16M of them the Llama 2 classifier; 8 decoder layers of width 512.
    "small": ModelArgs(dim=512, n_layers=8, n_heads=8, hidden_dim=1408, vocab_size=32000, max_seq_len=2048),
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=400, max_seq_len=2048),
}
TASKS = [*LEADERBOARD_SHOTS, "mmlu"]
# Documents in the sets the leaderboard evaluates: the weights of the "leaderboard mix" ratio.
LEADERBOARD_DOCUMENTS = {"arc_challenge": 1172, "hellaswag": 10042, "truthfulqa_mc2": 817, "winogrande": 1267,
                         "gsm8k": 1319, "mmlu": 14042}
CLOCKS = ("requests_s", "requests_cpu_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF model directory or hub id (default: a random model of --preset)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="shape of the random model")
    parser.add_argument("--data-dir", type=Path, help="task files in docs/eval.md's layout (default: generated)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated; mmlu is all 57 subjects")
    parser.add_argument("--docs", type=int, default=12, help="documents per generated task")
    parser.add_argument("--mmlu-docs", type=int, default=8, help="documents per generated MMLU subject (57); a real "
                        "subject has 100-1534, and one batch of them shares its five examples")
    parser.add_argument("--limit", type=int, help="documents per task to evaluate (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per forward pass, both sides")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(args.tasks) - set(TASKS)
    if unknown or not args.tasks:
        parser.error(f"--tasks takes names from {', '.join(TASKS)}, got {sorted(unknown) or 'none'}")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def random_model_dir(directory: Path, preset: str) -> Path:
    """A random-weight HF directory; the Llama 2 tokenizer for a 32000-token preset when the assets are there."""
    config = PRESETS[preset]
    if config.vocab_size == 32000 and LLAMA2_TOKENIZER.is_file():
        tokenizer = LLAMA2_TOKENIZER
    else:
        if config.vocab_size == 32000:
            log(f"warning: {LLAMA2_TOKENIZER} not found; training a 400-token tokenizer, so the classifier is far "
                "smaller than Llama 2's")
        tokenizer = train_tokenizer(directory, 400)
        config = config.replace(vocab_size=400)
    return write_hf_dir(directory / "model", random_model(config, std=0.08), tokenizer)


def max_difference(ours: dict, theirs: dict) -> float:
    """The largest gap between a score lm-eval reports and ours (standard errors included)."""
    gaps = [0.0]
    for task, metrics in theirs.items():
        for metric, value in metrics.items():
            mine = ours[task][metric]
            if value is None or mine is None:
                gaps.append(0.0 if value is mine else math.inf)
            else:
                gaps.append(abs(mine - value))
    return max(gaps)


def time_ours(llm, task: str, data_dir: Path, args: argparse.Namespace) -> tuple[dict, dict, int, int]:
    """llamaforge on one task: (results, times, documents, requests)."""
    runs = prepare([task], DataSource(data_dir), limit=args.limit)
    started, started_cpu = time.perf_counter(), time.process_time()
    report = evaluate(llm, runs, batch_size=args.batch_size, progress=not args.json)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    times = {"requests_s": time.perf_counter() - started, "requests_cpu_s": time.process_time() - started_cpu}
    requests = sum(len(group) for run in runs for group in run.requests) + sum(len(run.prompts) for run in runs)
    return report["results"], times, sum(len(run.docs) for run in runs), requests


def ratios(theirs: dict, ours: dict) -> dict:
    return {clock.removesuffix("_s"): theirs[clock] / ours[clock] for clock in CLOCKS}


def benchmark(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="llamaforge-eval-bench-"))
    # A hub id is resolved to its downloaded directory, which both sides then read.
    model = resolve(args.model) if args.model else random_model_dir(work, args.preset)
    subjects = tuple(MMLU_CATEGORY)
    data_dir = args.data_dir or write_eval_data(work / "data", n_eval=args.docs, subjects=subjects,
                                                n_mmlu=args.mmlu_docs)
    started = time.perf_counter()
    llm = llamaforge.load(model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - started
    tasks = {}
    for task in args.tasks:
        log(f"{task}: llamaforge")
        ours, our_times, documents, requests = time_ours(llm, task, data_dir, args)
        log(f"{task}: lm-eval (HF backend)")
        their_times: dict = {}
        theirs, _ = run_lm_eval(model, data_dir, [] if task == "mmlu" else [task], subjects if task == "mmlu" else (),
                                limit=args.limit, batch_size=args.batch_size, work_dir=work, dtype=args.dtype,
                                device=args.device, timings=their_times)
        their_times = {clock: their_times[clock] for clock in CLOCKS}
        tasks[task] = {"documents": documents, "requests": requests, "llamaforge": our_times, "lm_eval": their_times,
                       "speedup": ratios(their_times, our_times), "max_score_difference": max_difference(ours, theirs),
                       "scores": ours[task]}
    sums = {side: {clock: sum(t[side][clock] for t in tasks.values()) for clock in CLOCKS}
            for side in ("llamaforge", "lm_eval")}
    mix = {side: {clock: sum(LEADERBOARD_DOCUMENTS[name] * t[side][clock] / t["documents"]
                             for name, t in tasks.items()) for clock in CLOCKS} for side in ("llamaforge", "lm_eval")}
    return {
        "model": str(args.model or f"random {args.preset}"), "batch_size": args.batch_size, "dtype": args.dtype,
        "device": args.device, "threads": torch.get_num_threads(), "llamaforge_load_s": load_s, "tasks": tasks,
        "all": {**sums, "speedup": ratios(sums["lm_eval"], sums["llamaforge"])},
        "leaderboard_mix": {**mix, "speedup": ratios(mix["lm_eval"], mix["llamaforge"])},
        "max_score_difference": max(t["max_score_difference"] for t in tasks.values()),
    }


def format_table(report: dict) -> str:
    lines = [f"{report['model']}: batch {report['batch_size']}, {report['dtype']} on {report['device']} "
             f"({report['threads']} threads)",
             f"{'task':16} {'docs':>5} {'reqs':>5} {'llamaforge s':>13} {'lm-eval s':>10} {'speedup':>8} "
             f"{'llamaforge CPU s':>17} {'lm-eval CPU s':>14} {'speedup':>8}"]

    def row(name: str, documents: str, requests: str, entry: dict) -> str:
        ours, theirs, speedup = entry["llamaforge"], entry["lm_eval"], entry["speedup"]
        return (f"{name:16} {documents:>5} {requests:>5} {ours['requests_s']:13.2f} {theirs['requests_s']:10.2f} "
                f"{speedup['requests']:7.2f}x {ours['requests_cpu_s']:17.2f} {theirs['requests_cpu_s']:14.2f} "
                f"{speedup['requests_cpu']:7.2f}x")

    lines += [row(name, str(t["documents"]), str(t["requests"]), t) for name, t in report["tasks"].items()]
    lines += [row("all", "", "", report["all"]), row("leaderboard mix", "", "", report["leaderboard_mix"]),
              f"largest score difference from lm-eval: {report['max_score_difference']:.2e}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = benchmark(args)
    print(json.dumps(report, indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
