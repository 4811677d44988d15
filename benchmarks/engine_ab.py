"""The engine of two llamaforge checkouts side by side: decode throughput on unrelated prompts, alternating.

Each side runs in its own process (`python engine_ab.py --side PATH`, which imports llamaforge from PATH): the same
random-weight model (serve.py's 134M "small" shape by default), `--prompts` prompts of 60-300 random tokens that share
nothing (shifted every repeat, so no prefix cache helps), `--new-tokens` greedy tokens each, `--batch` sequences at
once. Sides alternate `--rounds` times; each side's medians and every run are reported, with whether both sides
produced the same tokens. Use it to check that an engine change costs nothing where it should not (made for the
paged KV cache: `git worktree add /tmp/before <commit>`).

    python benchmarks/engine_ab.py --before /tmp/before --after .
    python benchmarks/engine_ab.py --before . --after . --dim 64 --layers 2 --heads 4 --prompts 4 --rounds 1 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

LENGTHS = (120, 250, 60, 300, 180, 90, 220, 140)


def run_side(args: argparse.Namespace) -> dict:
    """In a side's own process: build the model and engine of the llamaforge at args.side, time the repeats."""
    sys.path.insert(0, str(Path(args.side).resolve()))
    import threading

    import torch

    from llamaforge.api import LLM
    from llamaforge.config import ModelArgs
    from llamaforge.engine import Engine, EngineRequest
    from llamaforge.model import Llama, init_weights
    from llamaforge.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    config = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, hidden_dim=args.dim * 8 // 3,
                       vocab_size=32000, max_seq_len=1024)
    llm = LLM(init_weights(Llama(config)).to(getattr(torch, args.dtype)).eval(), tokenizer=None)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (LENGTHS[i % len(LENGTHS)],), generator=generator).tolist()
               for i in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    engine = Engine(llm, max_batch_size=args.batch, max_context=512).start()

    def run(shift: int) -> tuple[float, list[list[int]]]:
        done, tokens = threading.Semaphore(0), [[] for _ in prompts]

        def emitter(index: int):
            def emit(event) -> None:
                tokens[index].append(event.token_id)
                if event.finish_reason:
                    done.release()
            return emit

        started = time.perf_counter()
        for index, prompt in enumerate(prompts):
            engine.submit(EngineRequest([1] + [(t + shift) % 32000 + 3 for t in prompt], params, emitter(index)))
        for _ in prompts:
            done.acquire()
        return time.perf_counter() - started, tokens

    try:
        run(0)  # warm-up
        seconds, tokens = zip(*(run(7 * (r + 1)) for r in range(args.repeats)), strict=True)
    finally:
        engine.stop()
    return {"tok_s": [len(prompts) * args.new_tokens / s for s in seconds], "tokens": tokens[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="checkout of the baseline")
    parser.add_argument("--after", type=Path, help="checkout of the change")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side per round")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8, help="the engine's max_batch_size")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args)))
        return
    if args.before is None or args.after is None:
        parser.error("give --before and --after (two checkouts of llamaforge)")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    runs: dict[str, list[float]] = {"before": [], "after": []}
    tokens = {}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            side = subprocess.run([sys.executable, __file__, *forwarded, "--side", str(getattr(args, name))],
                                  capture_output=True, text=True, check=True)
            result = json.loads(side.stdout.strip().splitlines()[-1])
            runs[name] += result["tok_s"]
            tokens[name] = result["tokens"]
    medians = {name: statistics.median(values) for name, values in runs.items()}
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("json", "side")},
              "runs": runs, "medians": medians, "ratio": medians["after"] / medians["before"],
              "same_tokens": tokens["before"] == tokens["after"], "date": time.strftime("%Y-%m-%d")}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name in ("before", "after"):
        print(f"{name}: {medians[name]:.2f} tok/s median [{', '.join(f'{v:.2f}' for v in runs[name])}]")
    print(f"after / before: {report['ratio']:.3f}; same tokens: {report['same_tokens']}")


if __name__ == "__main__":
    main()
