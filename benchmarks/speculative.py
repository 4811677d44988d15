"""Prompt-lookup speculative decoding against plain decoding: tokens/s, acceptance, and that greedy output is equal.

Two trained models, greedy, batch 1, alternating plain and speculative runs, medians: stories260K (../shared/assets;
skipped without it) telling its 200-token story from BOS, and the demo model answering held-out questions (its
answers repeat the numbers and words of the question, which prompt lookup finds). Decode tok/s counts the tokens
after the first over the time after the first. With `--engine N`, the demo questions also go through the server's
engine, N running at once (all submitted together); its tok/s is every generated token over the wall time.

    python benchmarks/speculative.py --speculate 4,8 --engine 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factories import SHARED_ASSETS  # noqa: E402

import llamaforge  # noqa: E402
from llamaforge.api import LLM  # noqa: E402
from llamaforge.engine import Engine, EngineRequest  # noqa: E402
from llamaforge.sampling import SamplingParams  # noqa: E402


def workloads(questions: int) -> list[tuple[str, LLM, list[list[int]], int]]:
    """(name, model, prompts, max new tokens) for each model present."""
    found = []
    stories = SHARED_ASSETS / "stories260K"
    if stories.is_dir():
        llm = llamaforge.load(stories / "stories260K.bin", tokenizer=stories / "tok512.model")
        found.append(("stories260K story", llm, [[1]], 200))
    demo = llamaforge.load()
    rows = [json.loads(line) for line in (llamaforge.checkpoint.DEMO_DIR / "heldout.jsonl").read_text().splitlines()]
    prompts = [demo.chat_tokens([*r["history"], {"role": "user", "content": r["question"]}]) for r in rows]
    found.append(("demo answers", demo, prompts[:: max(1, len(prompts) // questions)][:questions], 64))
    return found


def run(llm: LLM, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, list[list[int]], float]:
    """(decode tok/s over all prompts, the token ids, the acceptance rate) of one pass."""
    decode_s, tokens, outputs, proposed, accepted = 0.0, 0, [], 0, 0
    for prompt in prompts:
        out = llm.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        decode_s += out.timings["decode_s"]
        tokens += out.timings["decode_steps"]
        proposed += out.timings.get("draft_tokens", 0)
        accepted += out.timings.get("accepted_tokens", 0)
        outputs.append(out.token_ids)
    return tokens / decode_s, outputs, accepted / proposed if proposed else 0.0


def run_engine(llm: LLM, prompts: list[list[int]], max_new_tokens: int,
               batch: int) -> tuple[float, list[list[int]], float]:
    """(tok/s of every generated token over the wall time, the token ids, the acceptance rate) of one engine pass."""
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)
    engine = Engine(llm, max_batch_size=batch, max_queue=len(prompts)).start()

    def emitter(index: int):
        def emit(event) -> None:
            if isinstance(event, BaseException):
                raise event
            if not event.eos:
                outputs[index].append(event.token_id)
            if event.finish_reason:
                finished.release()
        return emit

    try:
        started = time.perf_counter()
        for index, prompt in enumerate(prompts):
            engine.submit(EngineRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
                                        emitter(index)))
        for _ in prompts:
            if not finished.acquire(timeout=600):
                raise RuntimeError("the engine did not finish every request")
        wall = time.perf_counter() - started
        stats = engine.stats()
    finally:
        engine.stop()
    return stats.generated_tokens / wall, outputs, stats.acceptance_rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speculate", default="4,8", help="comma-separated draft lengths to compare with plain")
    parser.add_argument("--questions", type=int, default=40, help="held-out demo questions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", type=int, default=0, metavar="N",
                        help="also run the demo questions through the engine, N at once (0: not)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(k) for k in args.speculate.split(",")]
    print(f"{time.strftime('%Y-%m-%d')}, greedy, batch 1, {args.threads} threads, median of {args.repeats}")
    print("| workload | speculate | decode tok/s | vs plain | acceptance | output equal to plain |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    cases = [(name, llm, prompts, max_new, run) for name, llm, prompts, max_new in workloads(args.questions)]
    if args.engine:
        name, llm, prompts, max_new, _ = cases[-1]
        cases.append((f"demo answers, engine, {args.engine} at once", llm, prompts, max_new,
                      lambda model, p, n: run_engine(model, p, n, args.engine)))
    for name, llm, prompts, max_new, run_pass in cases:
        variants = {0: llm} | {k: LLM(llm.model, llm.tokenizer, speculate=k) for k in lengths}
        results: dict[int, list] = {k: [] for k in variants}
        for _ in range(args.repeats + 1):  # the first pass warms up and is not counted
            for k, model in variants.items():
                results[k].append(run_pass(model, prompts, max_new))
        plain = statistics.median(r[0] for r in results[0][1:])
        for k, passes in results.items():
            speed = statistics.median(r[0] for r in passes[1:])
            equal = all(r[1] == results[0][0][1] for r in passes)
            print(f"| {name} | {k} | {speed:.1f} | {speed / plain:.2f} | {passes[-1][2]:.2f} | "
                  f"{'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
