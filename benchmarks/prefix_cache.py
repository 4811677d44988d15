"""A multi-turn chat through the engine with and without the prefix cache: time to first token at every turn.

Each turn's prompt is the conversation so far (a system prompt, the earlier messages and answers) and a new user
message, as a chat client sends it; with the cache the engine computes only what is new since the last turn.
One random-weight model (TinyLlama-1.1B's shape, int4 by default, as `llamaforge.load(..., quantize="int4")` makes
it) serves both engines in one process; the chats alternate between them, and medians over `--repeats` are
reported with every run. The answers must be the same token for token (greedy).

- time to first token: from submitting a turn to its first generated token (the prefill of what is not cached).
- history: the tokens before the turn's new message (what the cache can hold).

    python benchmarks/prefix_cache.py                          # 5 turns, histories up to ~1.4k tokens
    python benchmarks/prefix_cache.py --preset tiny --turns 3 --message-tokens 20 --answer-tokens 4 --json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import MODES, model_in_mode  # noqa: E402

from llamaforge.api import LLM  # noqa: E402
from llamaforge.config import PRESETS  # noqa: E402
from llamaforge.engine import Engine, EngineRequest  # noqa: E402
from llamaforge.model import Llama, init_weights  # noqa: E402
from llamaforge.sampling import SamplingParams  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--mode", default="int4", choices=sorted(MODES), help="weights (as benchmarks/decode.py)")
    parser.add_argument("--turns", type=int, default=5, help="turns of the chat")
    parser.add_argument("--system-tokens", type=int, default=200, help="tokens of the system prompt")
    parser.add_argument("--message-tokens", type=int, default=200, help="tokens of each user message")
    parser.add_argument("--answer-tokens", type=int, default=32, help="tokens of each answer")
    parser.add_argument("--repeats", type=int, default=3, help="chats per engine; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    total = args.system_tokens + args.turns * (args.message_tokens + args.answer_tokens) + 1
    if total > PRESETS[args.preset].max_seq_len:
        parser.error(f"the chat needs {total} tokens; {args.preset} holds {PRESETS[args.preset].max_seq_len}")
    return args


def ask(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """(seconds to the first token, the answer's ids) of one greedy request."""
    answer: list[int] = []
    first: list[float] = []
    done = threading.Event()

    def emit(event) -> None:
        if isinstance(event, BaseException):
            done.set()
            raise event
        first.append(first[0] if first else time.perf_counter())
        answer.append(event.token_id)
        if event.finish_reason:
            done.set()

    started = time.perf_counter()
    engine.submit(EngineRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True),
                                emit))
    if not done.wait(600) or len(answer) != new_tokens:
        raise RuntimeError("the engine did not answer the turn")
    return first[0] - started, answer


def chat(engine: Engine, system: list[int], messages: list[list[int]], new_tokens: int) -> tuple[list[float], list]:
    """Run the conversation turn by turn; each turn's time to first token and the answers."""
    history, ttft, answers = list(system), [], []
    for message in messages:
        prompt = history + message
        seconds, answer = ask(engine, prompt, new_tokens)
        ttft.append(seconds)
        answers.append(answer)
        history = prompt + answer
    return ttft, answers


def conversation(args: argparse.Namespace, vocab_size: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """A random system prompt (after BOS) and `turns` user messages."""
    ids = torch.randint(3, vocab_size, (args.system_tokens + args.turns * args.message_tokens,),
                        generator=torch.Generator().manual_seed(seed + 1)).tolist()
    messages = [ids[args.system_tokens + t * args.message_tokens:args.system_tokens + (t + 1) * args.message_tokens]
                for t in range(args.turns)]
    return [1, *ids[:args.system_tokens]], messages


def benchmark(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config = PRESETS[args.preset]
    llm = LLM(model_in_mode(init_weights(Llama(config), seed=0).eval(), args.mode), tokenizer=None)
    engines = {"cache": Engine(llm, max_batch_size=2).start(),
               "no cache": Engine(llm, max_batch_size=2, prefix_cache=False).start()}
    runs: dict[str, list[list[float]]] = {name: [] for name in engines}
    answers: dict[str, list] = {name: [] for name in engines}
    try:
        for engine in engines.values():  # warm-up (kernel builds, first allocations) on a conversation of its own
            chat(engine, *conversation(args, config.vocab_size, seed=-1), 2)
        warm = engines["cache"].stats()
        for repeat in range(args.repeats):
            # A new conversation each repeat: what the cache holds comes from earlier turns of the same chat only.
            system, messages = conversation(args, config.vocab_size, seed=repeat)
            for name in (list(engines) if repeat % 2 == 0 else list(engines)[::-1]):
                ttft, answer = chat(engines[name], system, messages, args.answer_tokens)
                runs[name].append(ttft)
                answers[name].append(answer)
        stats = {name: engine.stats() for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.stop()
    # The measured chats' (not the warm-up's) prompt tokens, and how many the cache supplied.
    queries = stats["cache"].prefix_cache_queries - warm.prefix_cache_queries
    hits = stats["cache"].prefix_cache_hits - warm.prefix_cache_hits
    histories = [1 + args.system_tokens + t * (args.message_tokens + args.answer_tokens) for t in range(args.turns)]
    turns = []
    for t in range(args.turns):
        row = {"turn": t + 1, "history_tokens": histories[t], "prompt_tokens": histories[t] + args.message_tokens}
        for name in engines:
            row[name] = {"ttft_s": statistics.median(r[t] for r in runs[name]), "runs": [r[t] for r in runs[name]]}
        row["speedup"] = row["no cache"]["ttft_s"] / row["cache"]["ttft_s"]
        turns.append(row)
    return {
        "setup": {"preset": args.preset, "mode": args.mode, "turns": args.turns, "system_tokens": args.system_tokens,
                  "message_tokens": args.message_tokens, "answer_tokens": args.answer_tokens,
                  "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d")},
        "same_answers": answers["cache"] == answers["no cache"],
        "prefix_cache": {"queries": queries, "hits": hits, "hit_rate": hits / queries},
        "turns": turns,
    }


def format_table(report: dict) -> str:
    setup = report["setup"]
    lines = [f"preset {setup['preset']} {setup['mode']}, {setup['turns']} turns ({setup['message_tokens']}-token "
             f"messages, {setup['answer_tokens']}-token answers, {setup['system_tokens']}-token system prompt), "
             f"greedy, {setup['threads']} threads, median of {setup['repeats']}; same answers: "
             f"{report['same_answers']}; hit rate {report['prefix_cache']['hit_rate']:.0%}", "",
             "| turn | history tokens | prompt tokens | TTFT no cache (s) | TTFT cache (s) | speedup |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in report["turns"]:
        lines.append(f"| {row['turn']} | {row['history_tokens']} | {row['prompt_tokens']} | "
                     f"{row['no cache']['ttft_s']:.3f} | {row['cache']['ttft_s']:.3f} | {row['speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = benchmark(args)
    print(json.dumps(report, indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
