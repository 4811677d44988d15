"""LoRA DPO training speed and memory: `llamaforge finetune --objective dpo` against trl's DPOTrainer + peft, same
weights, same pairs, same LoRA, same batch.

One random-weight model (Llama's architecture, 12 layers x 768 by default, the demo model's 651-token vocabulary
so that both sides can tokenize text) is written once as an HF folder with the demo tokenizer and llamaforge's chat
template; both sides read it and the same conversational pairs (an arithmetic question padded to
`--prompt-words` words, a right and a wrong answer), train LoRA r`--rank` on all seven projections, beta 0.1, the
sigmoid loss, AdamW at 1e-4, `--batch-size` pairs a step, fp32, gradient checkpointing on both sides unless
`--no-gradient-checkpointing` (on is trl's default). On a GPU both sides train in bf16 (llamaforge's
`--precision bf16`, trl's `bf16=True`) and memory is torch's peak allocation. Each side runs in its own subprocess
(peak memory is its own), `--warmup` steps then `--steps` timed ones:

- step seconds: the median optimizer step (forward, backward, optimizer; trl's also runs the reference model, the
  base with the adapter off, every step; llamaforge computed the reference log-probs once before the first step);
- setup seconds: loading, tokenizing (and for llamaforge the reference pass over every pair) before step 1;
- pairs/s: batch / median step; peak RSS growth over the set-up trainer; the first and last losses (the first is
  log 2 on both sides: the policy starts as the reference).

    python benchmarks/dpo.py                     # about 7 minutes on 2 cores
    python benchmarks/dpo.py --layers 2 --dim 128 --steps 2 --warmup 1 --json   # smoke test
    python benchmarks/dpo.py --layers 22 --dim 2048 --batch-size 8 --prompt-words 200 --json  # a GPU, 1.1B
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import TARGETS, rss_mb  # noqa: E402


def write_pairs(path: Path, count: int, prompt_words: int) -> Path:
    filler = " ".join(["please"] * max(prompt_words - 4, 0))
    rows = []
    for i in range(count):
        a, b = 3 + 7 * i % 40, 11 + 5 * i % 30
        rows.append({"prompt": [{"role": "user", "content": f"{filler} What is {a} plus {b}?".strip()}],
                     "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"{a} + {b} = {a + b + 1}."}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_model(directory: Path, args: argparse.Namespace) -> Path:
    import llamaforge
    from llamaforge.chat import JINJA_TEMPLATE
    from llamaforge.checkpoint.hf import save_hf_dir
    from llamaforge.config import ModelArgs
    from llamaforge.model import Llama, init_weights

    demo = llamaforge.load()  # its tokenizer
    config = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, vocab_size=demo.config.vocab_size,
                       hidden_dim=args.dim * 8 // 3 // 64 * 64, max_seq_len=1024)
    model = init_weights(Llama(config), seed=0)
    # bf16 on disk for a GPU run (each side trains in bf16 there): a 1B model's file halves.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return save_hf_dir(model.state_dict(), config, directory / "model", demo.tokenizer, dtype,
                       chat_template=JINJA_TEMPLATE)


def start_peak() -> float:
    """Reset the peak memory so set-up's does not count: torch's peak allocation on a GPU, else the process' peak RSS
    (VmHWM) to its current RSS; the baseline in MB."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()


def peak_since(baseline: float) -> float:
    """MB the peak memory rose over `baseline` since `start_peak`."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20 - baseline
    return rss_mb("VmHWM") - baseline


def sync() -> None:
    """Wait for the GPU's queued work, so a step's time is its own."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_llamaforge(args: argparse.Namespace) -> dict:
    from llamaforge.finetune import distributed
    from llamaforge.finetune.config import TrainConfig
    from llamaforge.finetune.preference_trainer import PreferenceTrainer

    config = TrainConfig(data=args.data, out=str(Path(args.work) / "ours"), model=args.model, objective="dpo",
                         method="lora", lora_r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                         lr=1e-4, warmup_ratio=0.0, schedule="constant", batch_size=args.batch_size, beta=0.1,
                         max_steps=args.warmup + args.steps, val_fraction=0.0, save_every=0, seq_len=1024,
                         precision="bf16" if torch.cuda.is_available() else "fp32",
                         gradient_checkpointing=args.gradient_checkpointing)
    info = distributed.setup("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    trainer = PreferenceTrainer(config, info)  # loads, encodes and computes the reference log-probs
    setup = time.perf_counter() - started
    baseline = start_peak()
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        step_started = time.perf_counter()
        losses.append(trainer._train_step()["loss"])
        trainer.step += 1
        sync()
        times.append(time.perf_counter() - step_started)
    peak = peak_since(baseline)
    return {"side": "llamaforge", "step_s": statistics.median(times[args.warmup:]), "setup_s": setup,
            "peak_mb": peak, "first_loss": losses[0], "last_loss": losses[-1]}


def run_trl(args: argparse.Namespace) -> dict:
    import datasets
    import peft
    import transformers
    import trl

    started = time.perf_counter()
    gpu = torch.cuda.is_available()
    # On a GPU a LoRA user loads the base in bf16, as llamaforge keeps it.
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model,
                                                              dtype=torch.bfloat16 if gpu else torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.unk_token
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    config = trl.DPOConfig(output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=args.batch_size,
                           learning_rate=1e-4, lr_scheduler_type="constant", beta=0.1, loss_type=["sigmoid"],
                           max_steps=args.warmup + args.steps, report_to=[], use_cpu=not gpu, bf16=gpu,
                           max_length=None, logging_steps=1, save_strategy="no", dataset_num_proc=None, seed=0,
                           gradient_checkpointing=args.gradient_checkpointing)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                           task_type="CAUSAL_LM")
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            sync()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            times.append(time.perf_counter() - self.started)

    trainer = trl.DPOTrainer(model=model, args=config, processing_class=tokenizer, peft_config=lora,
                             train_dataset=datasets.Dataset.from_list(rows), callbacks=[Timer()])
    setup = time.perf_counter() - started
    baseline = start_peak()
    trainer.train()
    peak = peak_since(baseline)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"side": "trl", "step_s": statistics.median(times[args.warmup:]), "setup_s": setup,
            "peak_mb": peak, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=60, help="words of each question (its length)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs a step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="on both sides (default on: trl's default)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--side", choices=["llamaforge", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps((run_llamaforge if args.side == "llamaforge" else run_trl)(args)))
        return
    with tempfile.TemporaryDirectory() as work:
        model = write_model(Path(work), args)
        data = write_pairs(Path(work) / "pairs.jsonl", args.pairs, args.prompt_words)
        results = {}
        for side in ("llamaforge", "trl"):
            command = [sys.executable, __file__, "--side", side, "--model", str(model), "--data", str(data),
                       "--work", work, *[a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]]
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS":
                                                                                             str(args.threads)})
            if done.returncode != 0:
                raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = results["llamaforge"], results["trl"]
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("side", "model", "data", "work", "json")},
              "results": results, "speedup": theirs["step_s"] / ours["step_s"],
              "memory_ratio": ours["peak_mb"] / theirs["peak_mb"] if theirs["peak_mb"] > 0 else None,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for side, row in results.items():
        print(f"{side:10} {row['step_s']:.3f} s a step ({args.batch_size / row['step_s']:.2f} pairs/s), setup "
              f"{row['setup_s']:.2f} s, peak memory +{row['peak_mb']:.0f} MB, loss {row['first_loss']:.4f} -> "
              f"{row['last_loss']:.4f}")
    print(f"llamaforge / trl: {report['speedup']:.2f}x the speed, {report['memory_ratio'] or float('nan'):.2f}x the "
          "memory")


if __name__ == "__main__":
    main()
