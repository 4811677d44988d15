"""DPO on top of the built-in demo model: the second half of the Llama 2 chat recipe, on what its first half left
weak. One command (about 8 minutes on a 2-core CPU):

    python recipes/demo/dpo.py --out build/demo-dpo            # the full example
    python recipes/demo/dpo.py --out /tmp/demo-dpo --smoke      # every stage on a few problems (CI)

The demo model compares numbers up to 999, but its training drew them uniformly from 0-999, so small numbers were
rare: asked "Which is larger, 3 or 8?" it mostly fails ("3 < 8, so 8 is8 is larger."). All seeded, each stage one
llamaforge command, printed as it runs:

1. problems: comparisons of two numbers, each mix of one-, two- and three-digit numbers in the shares DIGIT_MIXES
   gives; the prompts to sample on (prompts.jsonl), and held-out problems on other pairs of numbers in
   `llamaforge eval --data-dir`'s layout: small/ (both numbers below 100: what is to be learnt) and large/ (one of
   three digits: what the model knows and must keep);
2. `llamaforge eval --tasks demo_compare` on both, and `--tasks demo` (every skill's shipped held-out problems):
   greedy answers, exactly the expected text;
3. `llamaforge sample --pairs`: 8 answers to each prompt sampled from the model itself (temperature 1.2), scored by
   an exact-answer check (recipes/demo/rewards.py:compare); the best and the worst make a preference pair when one
   is right and one wrong: on-policy pairs, the model's own mistakes as the rejected answers;
4. `llamaforge finetune --objective dpo --rpo-alpha 1` (LoRA; the reference is the model the round starts from);
5. the evaluations of step 2 again, and `llamaforge eval --compare` on the small numbers, before against after;
6. each further round (`--rounds`, default 2) folds the adapter in (`llamaforge merge`) and samples from that model:
   the first round's new mistakes are the next round's rejected answers.

summary.json holds each round's accuracies, its pairs and its final DPO metrics (the held-out pairs' as val_).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from skills import compare_pair  # noqa: E402

SEED = 0
# Digit counts of the two numbers, and the problems of each per 100 of the training prompts and of the held-out set.
# The small ones are what the model gets wrong; the three-digit ones are what it gets right and must keep: trained
# on small numbers alone, it learnt that numbers have at most two digits ("491 > 46, so 46 is smaller.", and in
# conversions too: "Convert 552 liters ..." -> "551 liters is ...").
DIGIT_MIXES = {(1, 1): 15, (1, 2): 5, (2, 1): 15, (2, 2): 10, (3, 3): 15, (1, 3): 15, (3, 1): 15, (2, 3): 5, (3, 2): 5}
HELD_OUT_SHARE = 4  # one pair of numbers (either order) in this many is held out
# The held-out problems in two sets, by the larger number: both below 100 (to learn), or one of three digits (to keep).
HELD_OUT = {"small": lambda largest: largest < 100, "large": lambda largest: largest >= 100}


def number(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def held_out(a: int, b: int) -> bool:
    """Whether the pair of numbers (in either order) is kept for evaluation: a fixed share, by a hash of the pair."""
    return zlib.crc32(f"{min(a, b)} {max(a, b)}".encode()) % HELD_OUT_SHARE == 0


def make_problems(out: Path, train_size: int, eval_size: int) -> tuple[Path, dict[str, Path]]:
    """prompts.jsonl (questions to sample answers to) and the held-out problems with their answers (HELD_OUT's
    folders, each in `eval --data-dir`'s layout), the digit mixes shared as DIGIT_MIXES says (or as many as there
    are), no question twice, and no pair of numbers in both."""
    rng = random.Random(SEED)
    rows: dict[bool, list[dict]] = {True: [], False: []}
    for evaluation, size in ((True, eval_size), (False, train_size)):
        for mix, share in DIGIT_MIXES.items():
            questions: set[str] = set()
            wanted = size * share // 100
            for _ in range(50 * wanted):  # two one-digit numbers make only 360 questions: fewer is fine
                if len(questions) == wanted:
                    break
                a, b = number(rng, mix[0]), number(rng, mix[1])
                if a == b or held_out(a, b) != evaluation:
                    continue
                question, answer, key = compare_pair(rng, a, b)
                if question not in questions:
                    questions.add(question)
                    rows[evaluation].append({"skill": "compare", "variant": "single", "question": question,
                                             "answer": answer, "key": list(key), "history": []})
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": row["question"]}) + "\n" for row in rows[False]))
    held_out_dirs = {}
    for name, keep in HELD_OUT.items():
        folder = out / name
        (folder / "demo").mkdir(parents=True)
        (folder / "demo" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[True]
                                                            if keep(max(row["key"]))))
        held_out_dirs[name] = folder
    return prompts, held_out_dirs


def llamaforge(*args: str) -> str:
    """Run one llamaforge command, printed first; its standard output."""
    command = [sys.executable, "-m", "llamaforge", *args]
    print("+", " ".join(["llamaforge", *args]), flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def accuracy(model: list[str], out: Path, tasks: str, name: str, data_dir: Path | None = None,
             limit: int | None = None) -> dict:
    """`llamaforge eval` of the model (flags) on `tasks` (held-out problems from data_dir; None: the ones shipped
    with the demo model), written to out/name.json; exact-match accuracy per task."""
    path = out / f"{name}.json"
    llamaforge("eval", *model, "--tasks", tasks, *(["--data-dir", str(data_dir)] if data_dir else []), "--out",
               str(path), *(["--limit", str(limit)] if limit else []))
    results = json.loads(path.read_text())["results"]
    return {task: values["exact_match"] for task, values in results.items()}


def final_metrics(run: Path) -> dict:
    """The last training step's DPO metrics and the held-out pairs' (val_) ones."""
    from llamaforge.finetune.progress import read_metrics

    records = read_metrics(run / "metrics.jsonl")
    last = next(r for r in reversed(records) if "loss" in r)
    held = next((r for r in reversed(records) if "val_loss" in r), {})
    keep = ("loss", "rewards/margins", "rewards/accuracies", "val_loss", "val_rewards/margins",
            "val_rewards/accuracies")
    return {key: round(value, 4) for key, value in (last | held).items() if key in keep}


def evaluate(model: list[str], out: Path, held_out_sets: dict[str, Path], limit: int | None) -> dict[str, float]:
    """Exact-match accuracy of the model (flags) on the held-out compare problems (small and large numbers) and on
    every skill's shipped problems (`limit` of each: smoke mode), each eval's results in out/."""
    scores = {name: accuracy(model, out, "demo_compare", f"compare-{name}", folder)["demo_compare"]
              for name, folder in held_out_sets.items()}
    return scores | {"skills": accuracy(model, out, "demo", "skills", limit=limit)["demo"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/demo-dpo", help="folder for the data, runs and results (new)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of sample -> DPO (-> merge)")
    parser.add_argument("--n", type=int, default=8, help="answers sampled per prompt")
    parser.add_argument("--smoke", action="store_true", help="a few problems and steps: checks every stage runs")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"--out {out} already exists; choose a new folder")
    out.mkdir(parents=True)
    started = time.time()
    train_size, eval_size, limit = (100, 100, 10) if args.smoke else (3000, 1000, None)
    prompts, held_out_sets = make_problems(out, train_size, eval_size)
    rewards = f"{HERE / 'rewards.py'}:compare"
    dpo = ["--epochs", "2", "--beta", "0.5", "--lr", "3e-4", "--rpo-alpha", "1.0", "--batch-size", "8",
           "--seed", str(SEED)]
    if args.smoke:
        dpo = ["--max-steps", "2", "--batch-size", "2"]
    model: list[str] = []  # the shipped demo model
    summary = {"prompts": sum(1 for _ in prompts.open()),
               "held_out": {name: sum(1 for _ in (folder / "demo" / "test.jsonl").open())
                            for name, folder in held_out_sets.items()},
               "before": evaluate(model, out, held_out_sets, limit), "rounds": []}
    for round_number in range(1, args.rounds + 1):
        here = out / f"round{round_number}"
        here.mkdir()
        pairs = here / "pairs.jsonl"
        sampled = json.loads(llamaforge("sample", *model, "--prompts", str(prompts), "--n", str(args.n),
                                        "--temperature", "1.2", "--top-p", "1.0", "--max-new-tokens", "32",
                                        "--seed", str(SEED + round_number), "--reward-function", rewards, "--pairs",
                                        "--out", str(pairs), "--json"))
        llamaforge("finetune", *model, "--objective", "dpo", "--data", str(pairs), "--out", str(here / "run"),
                   "--method", "lora", *dpo)
        tuned = [*model, "--adapter", str(here / "run")]
        after = evaluate(tuned, here, held_out_sets, limit)
        print(llamaforge("eval", "--compare", str(out / "compare-small.json"), str(here / "compare-small.json"),
                         "--plot", str(here / "compare.png")))
        summary["rounds"].append({"pairs": sampled["pairs"], "sampled_accuracy": round(sampled["mean_reward"], 4),
                                  "dpo": final_metrics(here / "run"), "after": after})
        if round_number < args.rounds:
            llamaforge("merge", *tuned, "--out", str(here / "merged"))
            model = ["--model", str(here / "merged")]
    summary["minutes"] = round((time.time() - started) / 60, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
