"""Prefix caching in the engine's paged KV pool against vLLM's policy at equal KV memory: the share of prompt tokens
each reuses when more users chat at once than the engine decodes together.

`--users` users each hold a `--turns`-turn chat (a system prompt all share, `--message-tokens` a message,
`--answer-tokens` an answer, random token ids), their turns interleaved round-robin, one request at a time:

- engine: the real engine (`--slots` sequences at once, a KV pool of slots x `--context` positions in blocks of
  `--block`; full blocks shared, the start of a partly shared block copied, least recently used blocks evicted), its
  own prefix-cache counters;
- full blocks: the same requests through a model of vLLM's automatic prefix caching with the same memory (each
  block keyed by its tokens and all before it, reused whole, the least recently used unreferenced block evicted).

Until 2026-12-07 the engine kept finished sequences in their slots (one conversation per free slot): 70 / 67 / 69 /
31 / 32% at 1 / 2 / 4 / 8 / 16 users over 4 slots, where the paged model kept 68 / 70 / 71 / 72 / 39% (docs/
benchmarks.md): the reason the KV cache is paged now.

The model (random weights, `--preset`, default tiny) only answers: hit rates do not depend on it.

    python benchmarks/cache_policy.py                       # users 1, 2, 4, 8, 16 over 4 slots
    python benchmarks/cache_policy.py --users 2,8 --turns 2 --json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_cache import ask  # noqa: E402

from llamaforge.api import LLM  # noqa: E402
from llamaforge.config import PRESETS  # noqa: E402
from llamaforge.engine import Engine  # noqa: E402
from llamaforge.model import Llama, init_weights  # noqa: E402


class FullBlocksCache:
    """The reuse of vLLM's prefix cache: `blocks` blocks of `block` tokens, whole blocks only (LRU over unreferenced
    blocks)."""

    def __init__(self, blocks: int, block: int) -> None:
        self.capacity, self.block = blocks, block
        self.cached: OrderedDict[tuple, None] = OrderedDict()  # key: every token up to the block end; LRU first
        self.queries = self.hits = 0

    def request(self, prompt: list[int], answer: list[int]) -> None:
        """A prompt looked up (whole blocks from its start), then the sequence's blocks kept."""
        self.queries += len(prompt)
        reused = 0
        for end in range(self.block, len(prompt) + 1, self.block):
            key = tuple(prompt[:end])
            if key not in self.cached:
                break
            self.cached.move_to_end(key)
            reused = end
        self.hits += min(reused, len(prompt) - 1)  # the last prompt token is always computed, as in the engine
        sequence = prompt + answer
        for end in range(self.block, len(sequence) + 1, self.block):
            key = tuple(sequence[:end])
            self.cached[key] = None
            self.cached.move_to_end(key)
        while len(self.cached) > self.capacity:
            self.cached.popitem(last=False)


def trace(args: argparse.Namespace, users: int, vocab_size: int) -> list[tuple[int, list[int]]]:
    """(user, new message) in the order the requests come: every user's turn 1, then every user's turn 2, ..."""
    generator = torch.Generator().manual_seed(users)
    return [(user, torch.randint(3, vocab_size, (args.message_tokens,), generator=generator).tolist())
            for _ in range(args.turns) for user in range(users)]


def measure(args: argparse.Namespace, llm: LLM, users: int) -> dict:
    system = [1, *torch.randint(3, llm.config.vocab_size, (args.system_tokens,),
                                generator=torch.Generator().manual_seed(0)).tolist()]
    full_blocks = FullBlocksCache(args.slots * args.context // args.block, args.block)
    engine = Engine(llm, max_batch_size=args.slots, max_context=args.context, block_len=args.block).start()
    histories = {user: list(system) for user in range(users)}
    started = time.perf_counter()
    try:
        for user, message in trace(args, users, llm.config.vocab_size):
            prompt = histories[user] + message
            _, answer = ask(engine, prompt, args.answer_tokens)
            full_blocks.request(prompt, answer)
            histories[user] = prompt + answer
        stats = engine.stats()
    finally:
        engine.stop()
    return {"users": users, "engine_hit_rate": stats.prefix_cache_hit_rate,
            "full_blocks_hit_rate": full_blocks.hits / full_blocks.queries, "prompt_tokens": stats.prefix_cache_queries,
            "conversation_tokens": len(next(iter(histories.values()))), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--users", default="1,2,4,8,16", help="comma-separated user counts")
    parser.add_argument("--slots", type=int, default=4, help="sequences the engine decodes together")
    parser.add_argument("--context", type=int, default=256, help="positions per sequence (the pool: slots x this)")
    parser.add_argument("--block", type=int, default=16, help="positions per KV block")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=24)
    parser.add_argument("--message-tokens", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    longest = args.system_tokens + 1 + args.turns * (args.message_tokens + args.answer_tokens)
    if longest > args.context:
        parser.error(f"a conversation reaches {longest} tokens; --context {args.context} holds fewer")
    torch.set_num_threads(2)
    llm = LLM(init_weights(Llama(PRESETS[args.preset])).eval(), tokenizer=None)
    rows = [measure(args, llm, int(users)) for users in args.users.split(",")]
    report = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows,
              "date": time.strftime("%Y-%m-%d")}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.slots} sequences, a pool of {args.slots * args.context // args.block} blocks of {args.block}; "
          f"{args.turns} turns a user, conversations of {rows[0]['conversation_tokens']} tokens")
    print("| users | engine | full blocks only (vLLM's policy, simulated, same memory) |")
    print("| ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['users']} | {row['engine_hit_rate']:.0%} | {row['full_blocks_hit_rate']:.0%} |")


if __name__ == "__main__":
    main()
