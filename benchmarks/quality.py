"""What int8 / int4 cost in quality: perplexity of each mode on trained weights, against bfloat16 and llama.cpp.

Two trained models: Karpathy's stories260K (../shared/assets; skipped without it) on short stories written for
this check, and llamaforge's built-in demo model on its held-out dialogs. For each llamaforge mode the mean
negative log-likelihood per token is measured two ways:

- prompt: the whole text in one forward, as `llamaforge perplexity` and prefill compute it (int8 / int4 weights
  dequantized, activations unquantized);
- decode: one token at a time through the KV cache, as generation computes it (the int8 / int4 kernel, which
  also rounds activations to int8 in blocks of 32, as llama.cpp's Q8_0 / Q4_0 dot products do).

llama.cpp's side (with `--llamacpp-python`, see benchmarks/decode.py) scores the same texts from GGUF files of
the same weights: F16 written by llamaforge's exporter, Q8_0 and Q4_0 made from it by llama.cpp's quantizer.

    python benchmarks/quality.py --llamacpp-python .venv-llamacpp/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from decode import LlamaCpp, log  # noqa: E402
from factories import SHARED_ASSETS  # noqa: E402

import llamaforge  # noqa: E402
from llamaforge.checkpoint.gguf import write_gguf  # noqa: E402
from llamaforge.finetune.data import IGNORE_INDEX, encode_chat  # noqa: E402
from llamaforge.generate import Decoder  # noqa: E402

MODES = {"bf16": {}, "int8": {"quantize": "int8"}, "int8-g32": {"quantize": "int8", "group_size": 32},
         "int4": {"quantize": "int4"}, "int4-g64": {"quantize": "int4", "group_size": 64},
         "int4-g128": {"quantize": "int4", "group_size": 128}}
STORIES = [
    "Once upon a time, there was a little dog named Max. Max liked to run in the big green park. One day, he "
    "found a red ball under a tree. He was very happy and played with it all day.",
    "Tom and his sister Sue went to the beach. They built a big sand castle with a tall tower. A wave came and "
    "washed the castle away. Sue was sad, but Tom said, \"Let's build a new one!\" They laughed and started again.",
    "There was a small bird who could not fly. Every day she watched the other birds go up into the sky. Her mom "
    "said, \"Be patient, you will fly soon.\" One morning, the little bird flapped her wings and flew over the hill.",
    "Lily had a new toy car. It was shiny and blue. She wanted to show it to her friend Ben. Ben liked the car "
    "too, so they shared it and took turns. They were happy to play together.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    parser.add_argument("--dialogs", type=int, default=100, help="held-out dialogs of the demo model to score")
    parser.add_argument("--llamacpp-python", help="Python of a venv with llama-cpp-python (default: "
                        "$LLAMACPP_PYTHON, else .venv-llamacpp/bin/python if it exists)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if args.llamacpp_python is None:
        default = os.environ.get("LLAMACPP_PYTHON") or Path(__file__).resolve().parents[1] / ".venv-llamacpp/bin/python"
        args.llamacpp_python = str(default) if Path(default).exists() else None
    return args


def texts_of(llm: llamaforge.LLM, name: str, dialogs: int) -> list[tuple[list[int], list[bool]]]:
    """The token sequences a model is scored on (each starting with BOS), and which of their tokens count: every
    token of a story after BOS; a dialog's answers and their EOS (the questions are the user's, not the model's)."""
    if name == "stories260K":
        encoded = [llm.tokenizer.encode(story, bos=True) for story in STORIES]
        return [(ids, [False] + [True] * (len(ids) - 1)) for ids in encoded]
    heldout = llamaforge.checkpoint.DEMO_DIR / "heldout.jsonl"
    rows = [json.loads(line) for line in heldout.read_text().splitlines()][:dialogs]
    examples = [encode_chat(llm.tokenizer, [*row["history"], {"role": "user", "content": row["question"]},
                                            {"role": "assistant", "content": row["answer"]}]) for row in rows]
    return [(e.input_ids, [label != IGNORE_INDEX for label in e.labels]) for e in examples]


@torch.inference_mode()
def nll_prompt(llm: llamaforge.LLM, sequences: list[tuple[list[int], list[bool]]]) -> tuple[float, int]:
    """Summed negative log-likelihood of the scored tokens, each sequence in one forward."""
    total, count = 0.0, 0
    for ids, scored in sequences:
        log_probs = torch.log_softmax(llm.model(torch.tensor([ids])).float()[0, :-1], -1)  # (T - 1, V)
        for position in range(1, len(ids)):
            if scored[position]:
                total -= log_probs[position - 1, ids[position]].item()
                count += 1
    return total, count


@torch.inference_mode()
def nll_decode(llm: llamaforge.LLM, sequences: list[tuple[list[int], list[bool]]]) -> tuple[float, int]:
    """The same, one token at a time through the KV cache (generation's path and kernels)."""
    total, count = 0.0, 0
    decoder = Decoder(llm.model, compile=False)
    for ids, scored in sequences:
        cache = llm.model.new_kv_cache(1, len(ids))
        for position in range(1, len(ids)):
            logits = decoder(torch.tensor([ids[position - 1]]), torch.tensor([position - 1]), cache, position)
            if scored[position]:
                total -= torch.log_softmax(logits.float()[0], -1)[ids[position]].item()
                count += 1
    return total, count


def score_model(name: str, source: str | Path, tokenizer: Path | None, args: argparse.Namespace,
                llamacpp: LlamaCpp | None, workdir: Path) -> list[dict]:
    base = llamaforge.load(source, tokenizer=tokenizer, dtype="float32")
    sequences = texts_of(base, name, args.dialogs)
    log(f"{name}: {len(sequences)} texts, {sum(sum(scored) for _, scored in sequences)} scored tokens")
    rows = []
    for mode in args.modes:
        llm = llamaforge.load(source, tokenizer=tokenizer, dtype="bfloat16", **MODES[mode])
        for path, measure in (("prompt", nll_prompt), ("decode", nll_decode)):
            total, count = measure(llm, sequences)
            rows.append({"model": name, "side": "llamaforge", "mode": mode, "path": path, "tokens": count,
                         "nll": total / count, "ppl": math.exp(total / count)})
    if llamacpp is not None:
        f16 = write_gguf(base.model.state_dict(), base.config, base.tokenizer, workdir / f"{name}-f16.gguf", "f16")
        for kind in ("f16", "q8_0", "q4_0"):
            path = f16 if kind == "f16" else Path(llamacpp.ask(op="quantize", source=str(f16),
                                                               out=str(workdir / f"{name}-{kind}.gguf"),
                                                               kind=kind)["path"])
            llamacpp.load(path, args.threads, max(len(ids) for ids, _ in sequences) + 8, logits_all=True)
            total = count = 0
            for ids, scored in sequences:
                answer = llamacpp.ask(op="nll", tokens=ids, scored=scored)
                total, count = total + answer["nll"], count + answer["count"]
            rows.append({"model": name, "side": "llama.cpp", "mode": kind.upper(), "path": "llama.cpp",
                         "tokens": count, "nll": total / count, "ppl": math.exp(total / count)})
    reference = next(r["nll"] for r in rows if r["mode"] == "bf16" and r["path"] == "prompt") if "bf16" in \
        args.modes else None
    for row in rows:
        row["ppl_vs_bf16"] = math.exp(row["nll"] - reference) if reference is not None else None
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    llamacpp = LlamaCpp(args.llamacpp_python) if args.llamacpp_python else None
    models = [("demo", "demo", None)]
    stories = SHARED_ASSETS / "stories260K"
    if stories.is_dir():
        models.insert(0, ("stories260K", stories / "stories260K.bin", stories / "tok512.model"))
    else:
        log(f"stories260K: skipped ({stories} not found)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llamaforge-quality-") as workdir:
        for name, source, tokenizer in models:
            rows += score_model(name, source, tokenizer, args, llamacpp, Path(workdir))
    if llamacpp is not None:
        llamacpp.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| model | side | mode | path | tokens | perplexity | vs bf16 |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        versus = f"{(r['ppl_vs_bf16'] - 1) * 100:+.2f}%" if r["ppl_vs_bf16"] is not None else "-"
        print(f"| {r['model']} | {r['side']} | {r['mode']} | {r['path']} | {r['tokens']} | {r['ppl']:.4f} | {versus} |")


if __name__ == "__main__":
    main()
