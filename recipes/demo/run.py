"""Build llamaforge's demo chat model from nothing, with llamaforge's own trainer. One command:

    python recipes/demo/run.py --out build/demo            # the full recipe
    python recipes/demo/run.py --out /tmp/demo --smoke      # a few steps of every stage (CI)
    python recipes/demo/run.py --install                    # ... and make it the built-in model

Stages, all seeded: (1) problems for each skill (recipes/demo/skills.py; every byte written by the
project), a training set and a held-out evaluation set from another seed; (2) a SentencePiece BPE
tokenizer with Llama's settings (byte fallback, digits split, BOS=1, EOS=2); (3) pre-training from random
weights on the problems as plain text (`llamaforge finetune --init config.json --method full`);
(4) instruction tuning in the Llama 2 chat format (`--method full` on stage 3's model); (5) greedy
evaluation of the held-out problems with `llamaforge eval`'s `demo` task, accuracy per skill into eval.json.
The held-out problems ship with the model (heldout.jsonl), so `llamaforge eval` reruns stage 5 anywhere.
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

from skills import SKILLS, held_out, training  # noqa: E402

TRAIN_SEED, EVAL_SEED = 0, 1
QUOTED = re.compile(r"'[a-z]+'")
SPELLED = re.compile(r"\b(?:[a-z]-)+[a-z]\b")
WORD = re.compile(r"[A-Za-z]+")
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "Be concise.", "You are a friendly assistant.",
                  "Answer the question."]
# The chat format's tags as they appear in an encoded dialog (Meta's format puts a space before [INST]).
CHAT_TAGS = ("▁[INST]", "▁[/INST]", "▁<<SYS>>", "<</SYS>>")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_data(out: Path, problems: int, eval_per_skill: int) -> tuple[Path, Path, Path]:
    """Pre-training text (question and answer), chat examples and held-out problems (in `eval --data-dir`'s
    layout: out/demo/test.jsonl)."""
    evaluation_rows = held_out(EVAL_SEED, eval_per_skill)
    train = training(TRAIN_SEED, problems, evaluation_rows)
    text = write_jsonl(out / "pretrain.jsonl", [{"text": f"{p['question']}\n{p['answer']}"} for p in train])
    rng = random.Random(TRAIN_SEED)
    dialogs = []
    for p in train:
        turn = [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
        # A few with a system prompt, so that one typed in the playground does not throw the model off.
        system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.05 else []
        dialogs.append({"messages": system + turn})
    chat = write_jsonl(out / "chat.jsonl", dialogs)
    (out / "demo").mkdir(exist_ok=True)
    evaluation = write_jsonl(out / "demo" / "test.jsonl", evaluation_rows)
    return text, chat, evaluation


def train_tokenizer(out: Path) -> tuple[Path, int]:
    """SentencePiece BPE with Llama's settings whose pieces are bytes, characters and the recipe's words.

    Every word of the problems' wording (and each chat tag) is one piece, a user-defined symbol; there
    are no other merges, so anything else, made-up words above all, is spelt letter by letter: what
    reversing, spelling and counting letters need (a merge like "ac" would hide its letters), and short
    sequences for the fixed wording. Returns the file and the vocabulary size.
    """
    import sentencepiece

    dialogs = [json.loads(line)["messages"] for line in (out / "chat.jsonl").read_text().splitlines()]
    lines = [SPELLED.sub("", QUOTED.sub("''", "\n".join(m["content"] for m in dialog))) for dialog in dialogs]
    lines.append(" ".join(string.ascii_letters))  # every letter its own piece, even those only inside words
    symbols = sorted({"▁" + word for line in lines for word in WORD.findall(line) if len(word) > 1} | set(CHAT_TAGS))
    characters = set("".join(lines).replace(" ", "▁")) | {"▁"}
    # unk, BOS, EOS + 256 bytes + characters + words: no room left for merges.
    vocab_size = 3 + 256 + len(characters) + len(symbols)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=symbols, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2, input_sentence_size=len(lines),
        shuffle_input_sentence=False,
    )
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path, vocab_size


# The demo model's shape: 4 layers, 192 wide, 6 heads; about 1.9M parameters (4 MB in bf16). Small on
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
    """A stage's mean training loss over its last 50 steps and its validation loss."""
    from llamaforge.finetune.progress import read_metrics

    records = read_metrics(run / "metrics.jsonl")
    train = [r["loss"] for r in records if "loss" in r][-50:]
    return {"train_loss": round(sum(train) / len(train), 4),
            "val_loss": round(next(r["val_loss"] for r in reversed(records) if "val_loss" in r), 4)}


def evaluate(model_dir: Path, data_dir: Path) -> dict[str, float]:
    """Accuracy per skill: the `demo` evaluation task (greedy chat answers exactly the expected text).

    Addition and subtraction are also scored on the problems whose operands both have two digits
    ("addition 2-digit"), the target the demo model is held to; the rest have a 1-digit operand.
    """
    import llamaforge
    from llamaforge.eval.data import DataSource
    from llamaforge.eval.evaluator import evaluate as run_tasks
    from llamaforge.eval.evaluator import prepare

    runs = prepare(["demo", "demo_addition_2digit", "demo_subtraction_2digit"], DataSource(data_dir))
    results = run_tasks(llamaforge.load(model_dir, device="cpu"), runs, progress=False)["results"]
    return {run.task.name.removeprefix("demo_").replace("_2digit", " 2-digit"): results[run.task.name]["exact_match"]
            for run in runs}


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
    parser.add_argument("--problems", type=int, default=150_000, help="training problems, shared by skills.WEIGHTS")
    parser.add_argument("--eval-per-skill", type=int, default=100, help="held-out problems per evaluated skill")
    parser.add_argument("--batch-size", type=int, default=32, help="rows of 128 tokens per step")
    parser.add_argument("--pretrain-steps", type=int, default=900)
    parser.add_argument("--chat-steps", type=int, default=1900)
    args = parser.parse_args()
    if args.smoke and args.install:
        parser.error("--smoke makes a model that knows nothing; run the full recipe to --install")
    if args.smoke:
        args.problems, args.eval_per_skill, args.pretrain_steps, args.chat_steps = 200, 5, 3, 3
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    text, chat, evaluation = make_data(args.out, args.problems, args.eval_per_skill)
    tokenizer, vocab_size = train_tokenizer(args.out)
    config = write_config(args.out, vocab_size)
    # Rows of 128 tokens hold 3-5 packed problems; bf16 autocast is 1.7x faster than fp32 on this CPU
    # (AVX512-BF16); compiling costs more than it saves at this size.
    common = ["--seq-len", "128", "--batch-size", str(args.batch_size), "--val-fraction", "0.01",
              "--save-every", "500", "--warmup-ratio", "0.02", "--seed", "0", "--precision", "bf16", "--no-compile"]
    finetune("--init", str(config), "--tokenizer", str(tokenizer), "--data", str(text),
             "--out", str(args.out / "pretrain"), "--method", "full", "--lr", "2e-3",
             "--max-steps", str(args.pretrain_steps), *common)
    finetune("--model", str(args.out / "pretrain" / "model"), "--data", str(chat), "--out", str(args.out / "chat"),
             "--method", "full", "--lr", "1.5e-3", "--max-steps", str(args.chat_steps), *common)
    scores = evaluate(args.out / "chat" / "model", args.out)
    report = {"accuracy": scores, "skills": list(SKILLS), "minutes": round((time.perf_counter() - started) / 60, 1),
              "losses": {stage: final_losses(args.out / stage) for stage in ("pretrain", "chat")},
              "held_out_per_skill": args.eval_per_skill,
              "command": " ".join(["python", "recipes/demo/run.py", *sys.argv[1:]]),
              "model": str(args.out / "chat" / "model")}
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    for skill, accuracy in scores.items():
        print(f"{skill:12} {accuracy:6.1%}")
    print(f"model: {report['model']} ({report['minutes']:.1f} min)")
    if args.install:
        print(f"installed as the built-in demo model: {install(args.out / 'chat' / 'model', evaluation, report)}")


if __name__ == "__main__":
    main()
