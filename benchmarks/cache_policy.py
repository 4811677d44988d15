"""Prefix caching by slots (what the engine does) against paged blocks (vLLM's design) at equal KV memory: the share
of prompt tokens each reuses when more users chat at once than the engine has slots.

`--users` users each hold a `--turns`-turn chat (a system prompt all share, `--message-tokens` a message,
`--answer-tokens` an answer, random token ids), their turns interleaved round-robin, one request at a time:

- slots: the real engine (`--slots` slots of `--context` positions; a freed slot keeps its tokens, the next request
  takes the free slot that shares most with it, else the least recently used), its own prefix-cache counters;
- paged: the same requests through a model of a paged cache with the same memory (slots x context positions in
  blocks of `--block` tokens, each block keyed by its tokens and all before it, reused whole, the least recently
  used unreferenced block evicted first), as vLLM's automatic prefix caching keeps them. Simulated: no kernel here
  reads paged blocks, so this measures what the policy would reuse, not its speed.

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


class PagedCache:
    """The reuse of a paged prefix cache of `blocks` blocks of `block` tokens (LRU over unreferenced blocks)."""

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
    paged = PagedCache(args.slots * args.context // args.block, args.block)
    engine = Engine(llm, max_batch_size=args.slots, max_context=args.context).start()
    histories = {user: list(system) for user in range(users)}
    started = time.perf_counter()
    try:
        for user, message in trace(args, users, llm.config.vocab_size):
            prompt = histories[user] + message
            _, answer = ask(engine, prompt, args.answer_tokens)
            paged.request(prompt, answer)
            histories[user] = prompt + answer
        stats = engine.stats()
    finally:
        engine.stop()
    return {"users": users, "slots_hit_rate": stats.prefix_cache_hit_rate,
            "paged_hit_rate": paged.hits / paged.queries, "prompt_tokens": stats.prefix_cache_queries,
            "conversation_tokens": len(next(iter(histories.values()))), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--users", default="1,2,4,8,16", help="comma-separated user counts")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--context", type=int, default=256, help="positions per slot")
    parser.add_argument("--block", type=int, default=16, help="tokens per block of the paged cache")
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
    print(f"{args.slots} slots x {args.context} positions (= {args.slots * args.context // args.block} blocks of "
          f"{args.block}); {args.turns} turns a user, conversations of {rows[0]['conversation_tokens']} tokens")
    print("| users | slots (engine) | paged (simulated, same memory) |")
    print("| ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['users']} | {row['slots_hit_rate']:.0%} | {row['paged_hit_rate']:.0%} |")


if __name__ == "__main__":
    main()
