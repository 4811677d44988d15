"""Decode steps with the weights on 4 KB pages and on 2 MB (transparent huge) pages, in one process.

`import llamaforge` asks torch for huge pages (llamaforge/hugepages.py); this measures what that buys. One model of
`--preset`'s shape with random weights, in each `--modes` mode as `llamaforge.load` makes it, is copied twice: one
copy's tensors moved into memory advised MADV_NOHUGEPAGE (4 KB pages), the other's into memory advised
MADV_HUGEPAGE. Rounds alternate the two, each timing `--steps` fused decode steps (all layers and the output layer,
one new token at position 160 of a 256-position cache) and keeping the median; the table gives the median round
and the spread. Both copies give the same logits (checked); the kilobytes on huge pages come from
/proc/self/smaps, so a kernel that gives none shows it.

    python benchmarks/hugepages.py                    # as root, `chrt -f 10` first keeps other load off the cores
    python benchmarks/hugepages.py --preset tiny --rounds 1 --json   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import mmap
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import model_in_mode  # noqa: E402  (the model as llamaforge.load makes it in each mode)

from llamaforge.config import PRESETS  # noqa: E402
from llamaforge.model import KVCache, Llama, init_weights  # noqa: E402

PAGE = 4096


class Arena:
    """One anonymous private mapping, advised for huge pages or against them, that tensors are moved into."""

    def __init__(self, nbytes: int, huge: bool) -> None:
        self.memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.memory.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
        self.bytes = torch.frombuffer(self.memory, dtype=torch.uint8)  # keeps the mapping alive
        self.used = 0

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` in the arena (page-aligned)."""
        size = tensor.numel() * tensor.element_size()
        place = self.bytes[self.used:self.used + size].view(tensor.dtype).view(tensor.shape)
        place.copy_(tensor)
        self.used += -(-size // PAGE) * PAGE
        return place

    def huge_kb(self) -> int:
        """Kilobytes of the arena on huge pages, from /proc/self/smaps."""
        start = self.bytes.data_ptr()
        with open("/proc/self/smaps") as smaps:
            inside = False
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and not fields[0].endswith(":"):
                    low, high = (int(part, 16) for part in fields[0].split("-"))
                    inside = low <= start < high
                elif inside and fields[0] == "AnonHugePages:":
                    return int(fields[1])
        return 0


def moved(model: Llama, huge: bool) -> tuple[Llama, Arena]:
    """A copy of `model` whose parameters and buffers live in one arena."""
    twin = copy.deepcopy(model)
    tensors = [t for t in [*twin.parameters(), *twin.buffers()] if t.numel() > 0]
    arena = Arena(sum(-(-t.numel() * t.element_size() // PAGE) * PAGE for t in tensors), huge)
    with torch.no_grad():
        for tensor in tensors:
            tensor.data = arena.take(tensor)
    return twin, arena


def compare(base: Llama, mode: str, args: argparse.Namespace) -> dict:
    """Alternating rounds of decode steps on both copies of the model in `mode`."""
    model = model_in_mode(base, mode)
    copies = {"4 KB pages": moved(model, huge=False), "2 MB pages": moved(model, huge=True)}
    del model
    config = base.config
    caches = [KVCache.allocate(1, 256, config.n_kv_heads, config.head_dim, torch.bfloat16, "cpu")
              for _ in range(config.n_layers)]
    token, position = torch.tensor([5]), torch.tensor([160])
    seconds: dict[str, list[float]] = {name: [] for name in copies}
    with torch.inference_mode():
        logits = [twin.fused_decode(token, position, caches) for twin, _ in copies.values()]
        for round_ in range(args.rounds):
            order = list(copies.items()) if round_ % 2 == 0 else list(reversed(copies.items()))
            for name, (twin, _) in order:
                steps = []
                for _ in range(args.steps):
                    started = time.perf_counter()
                    twin.fused_decode(token, position, caches)
                    steps.append(time.perf_counter() - started)
                seconds[name].append(statistics.median(steps))
    row = {"mode": mode, "same_logits": bool(torch.equal(*logits))}
    for name, (_, arena) in copies.items():
        row[name] = {"ms_per_step": statistics.median(seconds[name]) * 1e3,
                     "rounds_ms": [s * 1e3 for s in seconds[name]], "huge_page_kb": arena.huge_kb()}
    row["speedup"] = row["4 KB pages"]["ms_per_step"] / row["2 MB pages"]["ms_per_step"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--modes", default="bf16,int8,int4", help="comma-separated, from bf16, int8, int4")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=6, help="decode steps a round (its median is the round's)")
    parser.add_argument("--threads", type=int, default=2, help="threads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = init_weights(Llama(PRESETS[args.preset]), seed=0).eval().to(torch.bfloat16)
    rows = [compare(base, mode, args) for mode in args.modes.split(",")]
    if args.json:
        print(json.dumps({"preset": args.preset, "threads": args.threads, "rounds": args.rounds, "results": rows}))
        return
    print(f"{args.preset}, {args.threads} threads, median of {args.rounds} alternating rounds of {args.steps} steps")
    print("| mode | 4 KB pages ms/step | 2 MB pages ms/step | speedup | huge-page MB (4 KB / 2 MB copy) "
          "| same logits |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")

    def cell(side: dict) -> str:
        return f"{side['ms_per_step']:.2f} [{min(side['rounds_ms']):.1f}-{max(side['rounds_ms']):.1f}]"

    for row in rows:
        small, huge = row["4 KB pages"], row["2 MB pages"]
        print(f"| {row['mode']} | {cell(small)} | {cell(huge)} | {row['speedup']:.3f} | "
              f"{small['huge_page_kb'] // 1024} / {huge['huge_page_kb'] // 1024} | {row['same_logits']} |")


if __name__ == "__main__":
    main()
