"""Build llamaforge's demo chat model from nothing, with llamaforge's own trainer. One command:

    python recipes/demo/run.py --out build/demo            # the full recipe
    python recipes/demo/run.py --out /tmp/demo --smoke      # a few steps of every stage (CI)
    python recipes/demo/run.py --install                    # ... and make it the built-in model

Stages, all seeded: (1) problems for each skill (recipes/demo/skills.py; every byte written by the
project), a training set and a held-out evaluation set from another seed; (2) a SentencePiece BPE
tokenizer with Llama's settings (byte fallback, digits split, BOS=1, EOS=2) whose pieces are the problems'
words; (3) training from random weights on dialogs in the Llama 2 chat format, each a conversation of
problems one after another, loss on the answers (`llamaforge finetune --init config.json --method full`);
(4) greedy evaluation of the held-out problems with `llamaforge eval`'s demo tasks (each skill as a single
question, as the last question of a dialog, and rephrased), accuracy per task into eval.json. The held-out
problems ship with the model (heldout.jsonl), so `llamaforge eval` reruns stage 4 anywhere.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from skills import SKILLS, SYSTEM, SYSTEM_PROMPTS, dialog, held_out, training  # noqa: E402

TRAIN_SEED, EVAL_SEED = 0, 1
QUOTED = re.compile(r"'[a-z]+'")
SPELLED = re.compile(r"\b(?:[a-z]-)+[a-z]\b")
WORD = re.compile(r"[A-Za-z]+")
# The chat format's tags as they appear in an encoded dialog (Meta's format puts a space before [INST]).
CHAT_TAGS = ("▁[INST]", "▁[/INST]", "▁<<SYS>>", "<</SYS>>")
# Tokens per training row: one conversation of about seven exchanges, so every answer is learnt after 0 to 7
# earlier ones (a dialog the evaluation asks is at most about 250 tokens: skills.DIALOG_CHARS).
CHAT_LEN = 256


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_problems(out: Path, problems: int, eval_per_skill: int) -> tuple[list[dict], Path]:
    """Training problems, and the held-out ones written in `eval --data-dir`'s layout (out/demo/test.jsonl)."""
    evaluation_rows = held_out(EVAL_SEED, eval_per_skill)
    (out / "demo").mkdir(exist_ok=True)
    return training(TRAIN_SEED, problems, evaluation_rows), write_jsonl(out / "demo" / "test.jsonl", evaluation_rows)


def train_tokenizer(out: Path, problems: list[dict]) -> tuple[Path, int]:
    """SentencePiece BPE with Llama's settings whose pieces are bytes, characters and the recipe's words.

    Every word of the problems' wording (and each chat tag) is one piece, a user-defined symbol; there
    are no other merges, so anything else, made-up words above all, is spelt letter by letter: what
    reversing, spelling and counting letters need (a merge like "ac" would hide its letters), and short
    sequences for the fixed wording. Extra spaces are dropped (SentencePiece's remove_extra_whitespaces):
    Meta's chat format ends each answer in the history with a space before EOS, and a tokenizer that kept
    it as a piece of its own taught the model to end every answer with a space. Returns the file and the
    vocabulary size.
    """
    import sentencepiece

    wording = [p for p in problems if p["skill"] != "out_of_scope" or p["key"][0] != "words"]  # not made-up words
    lines = [SPELLED.sub("", QUOTED.sub("''", f"{p['question']}\n{p['answer']}")) for p in wording]
    lines += SYSTEM_PROMPTS
    lines.append(" ".join(string.ascii_letters))  # every letter its own piece, even those only inside words
    symbols = sorted({"▁" + word for line in lines for word in WORD.findall(line) if len(word) > 1} | set(CHAT_TAGS))
    characters = set("".join(lines).replace(" ", "▁")) | {"▁"}
    # unk, BOS, EOS + 256 bytes + characters + words: no room left for merges.
    vocab_size = 3 + 256 + len(characters) + len(symbols)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=symbols, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2, input_sentence_size=len(lines),
        shuffle_input_sentence=False,
    )
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path, vocab_size


def fill_rows(sizes: list[int], row_len: int) -> list[list[int]]:
    """Consecutive items (by their sizes in tokens) in groups just over `row_len` tokens, so that every training
    row is full: the trainer cuts each to `row_len` (--on-long truncate), the last item's tail is all that is
    lost, and no row has padding. The few items left at the end are dropped."""
    groups, group, total = [], [], 0
    for index, size in enumerate(sizes):
        group.append(index)
        total += size
        if total > row_len:
            groups.append(group)
            group, total = [], 0
    return groups


def write_dialogs(out: Path, problems: list[dict], tokenizer_path: Path) -> Path:
    """The training dialogs: the problems one a turn, in rows of CHAT_LEN tokens (fill_rows), a few with a system
    prompt, so that one typed in the playground does not throw the model off."""
    from llamaforge.finetune.data import encode_chat
    from llamaforge.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    # Each exchange's length as the trainer encodes it (BOS, the turn, the answer, EOS).
    turns = [len(encode_chat(tokenizer, [{"role": "user", "content": p["question"]},
                                         {"role": "assistant", "content": p["answer"]}]).input_ids) for p in problems]
    rng = random.Random(TRAIN_SEED)
    dialogs = []
    for group in fill_rows(turns, CHAT_LEN):
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM else None
        messages = dialog([problems[i] for i in group[:-1]], problems[group[-1]]["question"], system)
        dialogs.append({"messages": [*messages, {"role": "assistant", "content": problems[group[-1]]["answer"]}]})
    return write_jsonl(out / "chat.jsonl", dialogs)


# The demo model's shape: 4 layers, 192 wide, 6 heads; about 2.0M parameters (4 MB in bf16). Small on
# purpose: within 30 CPU minutes a model this size sees 2.2x the tokens of a 6x256 one (8,500 vs 3,900
# tokens/s here), which teaches it more (compute-optimal models for this budget have 1-2M parameters).
SHAPE = {"dim": 192, "n_layers": 4, "n_heads": 6, "hidden_dim": 512, "max_seq_len": 2048}


def write_config(out: Path, vocab_size: int) -> Path:
    """config.json (HF format) of the shape with the tokenizer's vocabulary."""
    from llamaforge.config import ModelArgs

    path = out / "config.json"
    path.write_text(json.dumps(ModelArgs(vocab_size=vocab_size, **SHAPE).to_hf_config(), indent=2) + "\n")
    return path


def finetune(*args: str) -> None:
    command = [sys.executable, "-m", "llamaforge", "finetune", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def final_losses(run: Path) -> dict[str, float]:
    """The mean training loss over the last 50 steps and the validation loss (on the answers)."""
    from llamaforge.finetune.progress import read_metrics

    records = read_metrics(run / "metrics.jsonl")
    train = [r["loss"] for r in records if "loss" in r][-50:]
    return {"train_loss": round(sum(train) / len(train), 4),
            "val_loss": round(next(r["val_loss"] for r in reversed(records) if "val_loss" in r), 4)}


def evaluate(model_dir: Path, data_dir: Path, limit: int | None = None) -> dict[str, float]:
    """Accuracy per task of `llamaforge eval`'s demo tasks (greedy chat answers exactly the expected text):
    each skill asked alone ("addition"), as the last question of a dialog ("addition multi-turn") and
    rephrased ("addition phrasing"); addition and subtraction alone also by their operands' digits
    ("addition 2-digit": both have two; "addition 1-digit": one or both have one). `limit`: the first problems of
    each task only."""
    import llamaforge
    from llamaforge.eval.data import DataSource
    from llamaforge.eval.evaluator import evaluate as run_tasks
    from llamaforge.eval.evaluator import prepare
    from llamaforge.eval.tasks import DEMO_TASKS

    runs = prepare(list(DEMO_TASKS), DataSource(data_dir), limit=limit)
    results = run_tasks(llamaforge.load(model_dir, device="cpu"), runs, progress=False)["results"]
    return {readable(run.task.name): results[run.task.name]["exact_match"] for run in runs}


def readable(task: str) -> str:
    """A demo task's name as eval.json and the README write it: demo_addition_multiturn -> "addition multi-turn"."""
    name = task.removeprefix("demo_")
    for suffix, words in (("_multiturn", " multi-turn"), ("_phrasing", " phrasing"), ("_2digit", " 2-digit"),
                          ("_1digit", " 1-digit")):
        name = name.replace(suffix, words)
    return name


def install(model_dir: Path, held_out: Path, report: dict) -> Path:
    """Make the model the package's built-in demo model (`llamaforge.load()`), replacing the old one whole;
    its held-out problems go with it for `llamaforge eval`."""
    from llamaforge.checkpoint import DEMO_DIR
    from llamaforge.eval.tasks import DemoSkill

    staging = DEMO_DIR.with_name(f".{DEMO_DIR.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging)
    shutil.copy(held_out, staging / DemoSkill.dataset.bundled.name)
    (staging / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    staging.rename(DEMO_DIR)
    return DEMO_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    parser.add_argument("--smoke", action="store_true", help="tiny data and a few steps per stage")
    parser.add_argument("--install", action="store_true", help="copy the model into the package as its demo model")
    parser.add_argument("--problems", type=int, default=300_000, help="training problems, shared by skills.WEIGHTS")
    parser.add_argument("--eval-per-skill", type=int, default=100, help="held-out problems per evaluated skill")
    parser.add_argument("--batch-size", type=int, default=16, help=f"rows of {CHAT_LEN} tokens per step")
    parser.add_argument("--steps", type=int, default=4000)
    args = parser.parse_args()
    if args.smoke and args.install:
        parser.error("--smoke makes a model that knows nothing; run the full recipe to --install")
    if args.smoke:
        # 5 held-out problems a skill is the fewest whose additions and subtractions have both digit mixes.
        args.problems, args.eval_per_skill, args.steps = 400, 5, 3
        args.batch_size = 2
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    problems, evaluation = make_problems(args.out, args.problems, args.eval_per_skill)
    tokenizer, vocab_size = train_tokenizer(args.out, problems)
    config = write_config(args.out, vocab_size)
    chat = write_dialogs(args.out, problems, tokenizer)
    # bf16 autocast is 1.7x faster than fp32 on this CPU (AVX512-BF16); compiling costs more than it saves at
    # this size. Every row is one dialog cut to CHAT_LEN (fill_rows): no padding, and attention is the plain
    # causal kernel, with no mask of packed examples.
    finetune("--init", str(config), "--tokenizer", str(tokenizer), "--data", str(chat), "--out", str(args.out / "chat"),
             "--method", "full", "--lr", "2e-3", "--max-steps", str(args.steps), "--seq-len", str(CHAT_LEN),
             "--batch-size", str(args.batch_size), "--no-pack", "--val-fraction", "0.01", "--save-every", "500",
             "--warmup-ratio", "0.02", "--seed", "0", "--precision", "bf16", "--no-compile")
    # A smoke run's model knows nothing and never stops: one problem a task shows that every task runs.
    scores = evaluate(args.out / "chat" / "model", args.out, limit=1 if args.smoke else None)
    report = {"accuracy": scores, "skills": list(SKILLS), "minutes": round((time.perf_counter() - started) / 60, 1),
              "losses": final_losses(args.out / "chat"),
              "held_out_per_skill": args.eval_per_skill,
              "command": " ".join(["python", "recipes/demo/run.py", *sys.argv[1:]]),
              "model": str(args.out / "chat" / "model")}
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    for task, accuracy in scores.items():
        print(f"{task:24} {accuracy:6.1%}")
    print(f"model: {report['model']} ({report['minutes']:.1f} min)")
    if args.install:
        print(f"installed as the built-in demo model: {install(args.out / 'chat' / 'model', evaluation, report)}")


if __name__ == "__main__":
    main()
