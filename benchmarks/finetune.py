"""LoRA training throughput and peak memory: llamaforge against HF transformers + peft, same everything.

Both sides train the same random weights (HF's are llamaforge's, copied) on the same random token rows,
with LoRA of the same rank on the same layers (q/k/v/o/gate/up/down), the same batch and sequence
length, AdamW over the adapter, gradient checkpointing when asked, and bf16 autocast on GPUs. Each side
runs in its own subprocess (so peak memory is its own), does `--warmup` steps, then times `--steps`.

- tokens/s: batch x seq-len x steps / wall time of the timed steps (forward, backward, optimizer).
- peak memory: torch.cuda.max_memory_allocated on a GPU; peak RSS growth over the loaded model on CPU.
- loss: the first step's loss on both sides must agree (same weights, same data, same maths).

    python benchmarks/finetune.py                                    # CPU: a 12-layer 768-wide model
    python benchmarks/finetune.py --preset 7B --seq-len 2048 --batch-size 4 --gradient-checkpointing  # GPU
    python benchmarks/finetune.py --preset tiny --steps 2 --json     # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from llamaforge.config import PRESETS, ModelArgs
from llamaforge.model import Llama, init_weights

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# CPU default: GPT-2-small-like width, Llama's architecture; big enough that matmuls dominate.
CPU_SHAPE = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, hidden_dim=2048, max_seq_len=2048)


def model_args(preset: str | None) -> ModelArgs:
    return PRESETS[preset] if preset else CPU_SHAPE


def rss_mb(field: str = "VmRSS") -> float:
    """This process' resident memory (VmRSS), or its peak since start or since reset (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def build_base(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Llama:
    """Random weights, made on the device (a 7B model is built in seconds on a GPU)."""
    with torch.device(device):
        model = Llama(model_args(args.preset))
    if device.type == "cuda":
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0, 0.02)
    else:
        init_weights(model, seed=0)
    return model.to(dtype)


def batch_data(args: argparse.Namespace, vocab_size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)


def run_side(args: argparse.Namespace) -> dict:
    """One implementation's measurement, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    base_dtype = torch.bfloat16 if bf16 else torch.float32
    base = build_base(args, device, base_dtype)
    input_ids = batch_data(args, base.config.vocab_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if args.side == "llamaforge":
        from llamaforge.finetune.data import collate, unpacked_rows
        from llamaforge.finetune.trainer import token_loss_sum
        from llamaforge.lora import LoraConfig, add_lora

        if args.method == "qlora":
            from llamaforge.quantize import quantize_linears_nf4

            quantize_linears_nf4(base)
        model = add_lora(base, LoraConfig(r=args.rank, alpha=2 * args.rank, dropout=args.dropout,
                                          target_modules=TARGETS))
        model.gradient_checkpointing = args.gradient_checkpointing
        if args.compile:
            model.compile_layers()
        rows = unpacked_rows([_example(ids) for ids in input_ids.tolist()])
        batch = collate(rows)

        def loss_fn() -> torch.Tensor:
            labels = int((batch["labels"][:, 1:] != -100).sum())
            return token_loss_sum(model, batch, device, torch.bfloat16 if bf16 else torch.float32) / labels
    else:
        import peft
        import transformers

        config = transformers.LlamaConfig(**base.config.to_hf_config(), attn_implementation="sdpa")
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(config)
        hf.load_state_dict(base.state_dict(), assign=True)
        with torch.device(device):  # inv_freq is not in the state dict, so it is still on the meta device
            hf.model.rotary_emb = type(hf.model.rotary_emb)(config)
        del base
        if args.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.enable_input_require_grads()
        hf.config.use_cache = False
        lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                               target_modules=TARGETS, task_type="CAUSAL_LM")
        model = peft.get_peft_model(hf, lora)

        def loss_fn() -> torch.Tensor:
            with autocast:
                return model(input_ids=input_ids, labels=input_ids).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    baseline_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = []

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_rss) / 1024)
    return {"side": args.side, "tokens_per_s": args.batch_size * args.seq_len * args.steps / elapsed,
            "seconds_per_step": elapsed / args.steps, "peak_gib": peak, "first_loss": losses[0],
            "trainable": sum(p.numel() for p in params), "device": torch.cuda.get_device_name() if bf16 else "cpu"}


def _example(ids: list[int]):
    from llamaforge.finetune.data import Example

    return Example(ids, ids)  # every token labelled, as HF's labels=input_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: a 12x768 model)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--sides", default="llamaforge,hf",
                        help="comma-separated runs: llamaforge, llamaforge-compiled, llamaforge-qlora, "
                        "llamaforge-qlora-compiled, hf")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--side", choices=["llamaforge", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(run_side(args)))
        return
    results = {}
    flags = {"llamaforge": [], "llamaforge-compiled": ["--compile"], "llamaforge-qlora": ["--method", "qlora"],
             "llamaforge-qlora-compiled": ["--method", "qlora", "--compile"], "hf": []}
    passed = [a for a in sys.argv[1:] if a != "--json"]
    for name in args.sides.split(","):
        side = "hf" if name == "hf" else "llamaforge"
        command = [sys.executable, __file__, "--side", side, *flags[name], *passed]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:  # report it and go on: one broken side should not cost the others' numbers
            print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)  # kept if a later run hangs
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("side", "json", "compile", "method")},
              "results": results}
    if "hf" in results:
        theirs = results["hf"]
        report["vs_hf"] = {name: {"speedup": row["tokens_per_s"] / theirs["tokens_per_s"],
                                  "memory_ratio": row["peak_gib"] / theirs["peak_gib"] if theirs["peak_gib"] else None,
                                  "first_loss_delta": abs(row["first_loss"] - theirs["first_loss"])}
                           for name, row in results.items() if name != "hf"}
    if args.json:
        print(json.dumps(report))
        return
    if not results:
        sys.exit("every run failed")
    first = next(iter(results.values()))
    print(f"device {first['device']}; preset {args.preset or '12x768'}; batch {args.batch_size} x {args.seq_len}; "
          f"LoRA r{args.rank} on {len(TARGETS)} projections; gradient checkpointing {args.gradient_checkpointing}")
    for name, row in results.items():
        ratio = report.get("vs_hf", {}).get(name)
        versus = f"  {ratio['speedup']:.2f}x HF's speed, {ratio['memory_ratio']:.2f}x its memory" if ratio else ""
        print(f"  {name:20} {row['tokens_per_s']:9.1f} tokens/s  {row['seconds_per_step']:7.3f} s/step  "
              f"peak {row['peak_gib']:6.2f} GiB  first loss {row['first_loss']:.4f}{versus}")


if __name__ == "__main__":
    main()
