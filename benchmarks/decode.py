"""Batch-1 greedy prefill and decode throughput: llamaforge against HF transformers on the same weights.

Both models hold the same random weights (HF's parameters are llamaforge's tensors, assigned, so memory
is not doubled) and decode the same fixed random prompt greedily for exactly `--new-tokens` tokens.

- prefill: time to first token (prompt forward + first greedy pick), reported as prompt tokens/s.
- decode: seconds per further token, from the first new token to the last; llamaforge's from
  `generate_events` timings, HF's from when its `generate` hands each token to a streamer.
- decode GB/s: model bytes x decode tokens/s, the weight bandwidth a memory-bound decode needs (as gpt-fast
  reports it).

Each case gets a warm-up run, then `--repeats` measured runs, llamaforge and HF alternating; medians are
reported. Greedy tokens of the two implementations are compared for every dtype (fp32 must match; bf16
may drift on near-ties).

    python benchmarks/decode.py                                   # TinyLlama-1.1B shape, fp32 and bf16
    python benchmarks/decode.py --preset tiny --repeats 1 --json  # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from llamaforge.config import PRESETS, ModelArgs
from llamaforge.generate import generate_events
from llamaforge.model import Llama, init_weights
from llamaforge.sampling import SamplingParams

Run = Callable[[], tuple[float, float, list[int]]]  # () -> (prefill s, decode s per token, generated ids)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Measurement:
    """Medians over the repeats for one implementation in one dtype."""

    prefill_s: float
    decode_s_per_token: float
    tokens: list[int]
    runs: list[tuple[float, float]]  # (prefill s, decode s per token) of every measured run

    def prefill_tok_s(self, prompt_len: int) -> float:
        return prompt_len / self.prefill_s

    def decode_tok_s(self) -> float:
        return 1.0 / self.decode_s_per_token


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, from " + ", ".join(DTYPES))
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per case; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        parser.error(f"--dtypes takes names from {', '.join(DTYPES)}, got {unknown or 'none'}")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2, --prompt-len and --repeats >= 1")
    if args.prompt_len + args.new_tokens > PRESETS[args.preset].max_seq_len:
        parser.error(f"--prompt-len + --new-tokens exceeds {args.preset}'s {PRESETS[args.preset].max_seq_len} tokens")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def hf_twin(model: Llama) -> LlamaForCausalLM:
    """An HF `LlamaForCausalLM` whose parameters are `model`'s tensors (shared, not copied)."""
    hf_config = LlamaConfig(**model.config.to_hf_config())
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(hf_config)
    hf_model.load_state_dict(model.state_dict(), assign=True, strict=True)
    # inv_freq is a non-persistent buffer, so the state dict left it on the meta device.
    hf_model.model.rotary_emb = LlamaRotaryEmbedding(hf_config)
    return hf_model.eval()


def run_ours(model: Llama, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds per token, generated ids) of one greedy llamaforge run."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    timings: dict[str, float] = {}
    tokens = [event.token_id for event in generate_events(model, None, [prompt], [params], timings=timings)]
    return timings["prefill_s"], timings["decode_s"] / timings["decode_steps"], tokens


class TokenClock(BaseStreamer):
    """A streamer that only notes when `generate` hands it tokens: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model: LlamaForCausalLM, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds per token, generated ids) of one greedy HF `generate`.

    The prefill ends when the first new token reaches the streamer; decoding is the time from there to
    the last token, per token after the first (as llamaforge's timings count it).
    """
    clock = TokenClock()
    started = time.perf_counter()
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=model.config.eos_token_id, streamer=clock)
    first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt, before any forward pass
    return first - started, (last - first) / (new_tokens - 1), output[0, input_ids.shape[1]:].tolist()


def measure_pair(ours: Run, theirs: Run, repeats: int) -> tuple[Measurement, Measurement]:
    """Warm both up, then alternate them `repeats` times (so drift in the machine hits both alike); medians."""
    ours()
    theirs()
    ours_results, their_results = [], []
    for _ in range(repeats):
        ours_results.append(ours())
        their_results.append(theirs())
    return median(ours_results), median(their_results)


def median(results: list[tuple[float, float, list[int]]]) -> Measurement:
    """Median prefill and decode times of several runs; tokens from the first."""
    return Measurement(statistics.median(r[0] for r in results), statistics.median(r[1] for r in results),
                       results[0][2], [(r[0], r[1]) for r in results])


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def compare(ours: Llama, prompt_ids: torch.Tensor, args: argparse.Namespace, name: str) -> dict:
    """Measure llamaforge and its HF twin in ours' current dtype; a JSON-ready row."""
    hf_model = hf_twin(ours)
    prompt = prompt_ids[0].tolist()
    log(f"{name}: llamaforge and HF transformers, a warm-up and {args.repeats} alternating runs each")
    mine, theirs = measure_pair(lambda: run_ours(ours, prompt, args.new_tokens),
                                lambda: run_hf(hf_model, prompt_ids, args.new_tokens), args.repeats)
    size = model_bytes(ours)
    row = {"dtype": name, "model_bytes": size, "tokens_match": mine.tokens == theirs.tokens,
           "hf_attn_implementation": hf_model.config._attn_implementation}
    for label, m in (("llamaforge", mine), ("hf", theirs)):
        row[label] = {
            "prefill_s": m.prefill_s,
            "prefill_tok_s": m.prefill_tok_s(args.prompt_len),
            "decode_ms_per_token": m.decode_s_per_token * 1e3,
            "decode_tok_s": m.decode_tok_s(),
            "decode_gb_s": size * m.decode_tok_s() / 1e9,
            "tokens": m.tokens,
            "runs": [{"prefill_s": p, "decode_s_per_token": d} for p, d in m.runs],
        }
    row["ratio"] = {key: row["llamaforge"][key] / row["hf"][key] for key in ("prefill_tok_s", "decode_tok_s")}
    return row


def benchmark(args: argparse.Namespace) -> dict:
    """Measure every dtype; return a JSON-ready dict of the setup and the per-dtype results."""
    torch.set_num_threads(args.threads)
    config: ModelArgs = PRESETS[args.preset]
    log(f"building {args.preset} with random weights ({config.num_parameters() / 1e6:.1f}M parameters)")
    ours = init_weights(Llama(config), seed=args.seed).eval()
    prompt_ids = torch.randint(3, config.vocab_size, (1, args.prompt_len),
                               generator=torch.Generator().manual_seed(args.seed))
    results = []
    for name in args.dtypes:
        ours = ours.to(DTYPES[name])
        results.append(compare(ours, prompt_ids, args, name))
        gc.collect()  # drop the HF twin's references to the previous dtype's tensors
    return {
        "setup": {
            "preset": args.preset, "config": {k: v for k, v in asdict(config).items() if k != "extra"},
            "parameters": config.num_parameters(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "results": results,
    }


def format_table(report: dict) -> str:
    """The results as a Markdown table: both implementations side by side, and ours / HF."""
    setup = report["setup"]
    lines = [
        f"preset {setup['preset']} ({setup['parameters'] / 1e6:.1f}M parameters), batch 1, prompt "
        f"{setup['prompt_len']} tokens, {setup['new_tokens']} new tokens, greedy, {setup['threads']} threads, "
        f"median of {setup['repeats']}; torch {setup['torch']}, transformers {setup['transformers']}",
        "",
        "| dtype | model MB | metric | llamaforge | HF transformers | ours / HF |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in report["results"]:
        ours, hf = row["llamaforge"], row["hf"]
        mb = f"{row['model_bytes'] / 1e6:.1f}"
        lines += [
            f"| {row['dtype']} | {mb} | prefill tok/s | {ours['prefill_tok_s']:.1f} | {hf['prefill_tok_s']:.1f} "
            f"| {row['ratio']['prefill_tok_s']:.2f} |",
            f"| {row['dtype']} | {mb} | decode tok/s | {ours['decode_tok_s']:.2f} | {hf['decode_tok_s']:.2f} "
            f"| {row['ratio']['decode_tok_s']:.2f} |",
            f"| {row['dtype']} | {mb} | decode GB/s | {ours['decode_gb_s']:.2f} | {hf['decode_gb_s']:.2f} | |",
            f"| {row['dtype']} | {mb} | greedy tokens match | {'yes' if row['tokens_match'] else 'NO'} | | |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = benchmark(args)
    print(json.dumps(report, indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
