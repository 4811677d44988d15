"""Build llamaforge's demo chat model from nothing, with llamaforge's own trainer. One command:

    python recipes/demo/run.py --out build/demo            # the full recipe
    python recipes/demo/run.py --out /tmp/demo --smoke      # a few steps of every stage (CI)

Stages, all seeded: (1) problems for each skill (recipes/demo/skills.py; every byte written by the
project), a training set and a held-out evaluation set from another seed; (2) a SentencePiece BPE
tokenizer with Llama's settings (byte fallback, digits split, BOS=1, EOS=2); (3) pre-training from random
weights on the problems as plain text (`llamaforge finetune --init config.json --method full`);
(4) instruction tuning in the Llama 2 chat format (`--method full` on stage 3's model); (5) greedy
evaluation of the held-out problems through `LLM.chat`, accuracy per skill into eval.json.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from skills import EVALUATED, SKILLS, held_out, training  # noqa: E402

TRAIN_SEED, EVAL_SEED = 0, 1
QUOTED = re.compile(r"'[a-z]+'")
SPELLED = re.compile(r"\b(?:[a-z]-)+[a-z]\b")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_data(out: Path, per_skill: int, eval_per_skill: int, pretrain_on: str = "problems") -> tuple[Path, Path, Path]:
    """Pre-training text (whole problems, or answers only), chat examples and held-out problems."""
    evaluation_rows = held_out(EVAL_SEED, eval_per_skill)
    train = training(TRAIN_SEED, per_skill, evaluation_rows)
    texts = [p["answer"] if pretrain_on == "answers" else f"{p['question']}\n{p['answer']}" for p in train]
    text = write_jsonl(out / "pretrain.jsonl", [{"text": t} for t in texts])
    chat = write_jsonl(out / "chat.jsonl", [{"messages": [{"role": "user", "content": p["question"]},
                                                          {"role": "assistant", "content": p["answer"]}]}
                                            for p in train])
    evaluation = write_jsonl(out / "eval.jsonl", evaluation_rows)
    return text, chat, evaluation


def train_tokenizer(out: Path, vocab_size: int) -> Path:
    """SentencePiece BPE with Llama's settings, on the training problems and the chat format's tags."""
    import sentencepiece

    dialogs = [json.loads(line)["messages"] for line in (out / "chat.jsonl").read_text().splitlines()]
    lines = [f"{user['content']}\n{answer['content']}" for user, answer in dialogs]
    # Leave the made-up words out, so the vocabulary has no merges of them: they tokenize letter by
    # letter, which is what reversing, spelling and counting letters need.
    lines = [SPELLED.sub("", QUOTED.sub("''", line)) for line in lines]
    lines += ["[INST] <<SYS>>\n\n<</SYS>>\n\n [/INST]"] * 50
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=1.0, minloglevel=2, input_sentence_size=len(lines), shuffle_input_sentence=False,
    )
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


# The demo model's shape: 6 layers, 256 wide, 8 heads; about 5.6M parameters (11 MB in bf16).
SHAPE = {"dim": 256, "n_layers": 6, "n_heads": 8, "hidden_dim": 768, "max_seq_len": 512}


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


def evaluate(model_dir: Path, evaluation: Path) -> dict[str, float]:
    """Accuracy per skill: greedy chat answers equal to the expected answer."""
    import llamaforge

    llm = llamaforge.load(model_dir, device="cpu")
    rows = [json.loads(line) for line in evaluation.read_text().splitlines()]
    correct = {skill: [] for skill in EVALUATED}
    for row in rows:
        out = llm.chat([{"role": "user", "content": row["question"]}], temperature=0, max_new_tokens=64)
        correct[row["skill"]].append(out.text.strip() == row["answer"] and out.finish_reason == "stop")
    return {skill: sum(hits) / len(hits) for skill, hits in correct.items() if hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    parser.add_argument("--smoke", action="store_true", help="tiny data and a few steps per stage")
    parser.add_argument("--per-skill", type=int, default=6000, help="training problems per skill")
    parser.add_argument("--eval-per-skill", type=int, default=100, help="held-out problems per evaluated skill")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="rows of 512 tokens per step")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--chat-steps", type=int, default=500)
    parser.add_argument("--pretrain-on", choices=["problems", "answers"], default="problems",
                        help="pre-training text: question and answer, or the answers alone (shorter, all learnable)")
    args = parser.parse_args()
    if args.smoke:
        args.per_skill, args.eval_per_skill, args.vocab_size, args.pretrain_steps, args.chat_steps = 20, 5, 400, 3, 3
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    text, chat, evaluation = make_data(args.out, args.per_skill, args.eval_per_skill, args.pretrain_on)
    tokenizer = train_tokenizer(args.out, args.vocab_size)  # 256 byte pieces + characters + merges
    config = write_config(args.out, args.vocab_size)
    common = ["--seq-len", "512", "--batch-size", str(args.batch_size), "--val-fraction", "0.01",
              "--save-every", "500", "--warmup-ratio", "0.02", "--seed", "0", "--no-compile"]
    finetune("--init", str(config), "--tokenizer", str(tokenizer), "--data", str(text),
             "--out", str(args.out / "pretrain"), "--method", "full", "--lr", "2e-3",
             "--max-steps", str(args.pretrain_steps), *common)
    finetune("--model", str(args.out / "pretrain" / "model"), "--data", str(chat), "--out", str(args.out / "chat"),
             "--method", "full", "--lr", "1e-3", "--max-steps", str(args.chat_steps), *common)
    scores = evaluate(args.out / "chat" / "model", evaluation)
    report = {"accuracy": scores, "skills": list(SKILLS), "minutes": (time.perf_counter() - started) / 60,
              "model": str(args.out / "chat" / "model")}
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    for skill, accuracy in scores.items():
        print(f"{skill:12} {accuracy:6.1%}")
    print(f"model: {report['model']} ({report['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
