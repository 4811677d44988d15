"""Attention over the KV cache: the bfloat16 C kernel against the torch ops it replaces, side by side.

Three measurements, each alternating the two sides in one process (2 threads):

- one layer of TinyLlama-1.1B's heads (32 queries, 4 key-value heads, head size 64), one new token over 170, 1024
  and 4096 cached positions: `kernels.bf16_decode_attention` against `model.decode_attention` (two bfloat16
  matmuls, mask, float softmax), median of `--calls` alternating calls, with the share of equal outputs;
- the same layer for a prompt's chunk of `--chunk` causal queries ending at each cached length (what a prefill
  chunk or a cached prompt's suffix computes): the kernel against torch's SDPA (flash attention), which a bfloat16
  model ran for chunks over 16 queries before the kernel took them all (its numbers do not depend on the split);
- a whole decode step of the TinyLlama-shaped model (`--preset`; random weights, `--mode` int4 by default, 128
  cached tokens), eager and compiled, with each attention module's kernel switched on and off in `--rounds`
  alternating rounds of 20 steps: the median step time of each side.

    python benchmarks/attention.py            # as root, `chrt -f 10` first keeps other load off the cores
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llamaforge.config import PRESETS
from llamaforge.generate import Decoder
from llamaforge.model import Llama, cached_attention, init_weights
from llamaforge.quantize import kernels, quantize_model, use_bf16_kernel


def one_layer(lengths: list[int], calls: int, queries: int = 1) -> None:
    """Median microseconds of the kernel and of torch (`model.cached_attention`: two matmuls for one query, SDPA for
    a chunk) for one layer, `queries` causal queries ending at each cached length."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, queries, 64, generator=generator).bfloat16()
    cache = torch.randn(2, 1, 4, max(lengths), 64, generator=generator).bfloat16()
    print(f"| cached tokens ({queries} queries) | torch us | kernel us | torch / kernel | equal outputs |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for length in lengths:
        k, v = cache[0, :, :, :length], cache[1, :, :, :length]
        positions = torch.arange(length - queries, length)
        mask = (torch.arange(length)[None, :] <= positions[:, None])[None, None]  # (1, 1, queries, length)
        sides = {"torch": cached_attention, "kernel": kernels.bf16_decode_attention}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(calls + 5):  # the first 5 of each side warm up
            for name, run in sides.items():
                started = time.perf_counter()
                run(q, k, v, mask)
                times[name].append(time.perf_counter() - started)
        torch_us, kernel_us = (statistics.median(times[name][5:]) * 1e6 for name in sides)
        equal = (cached_attention(q, k, v, mask) == kernels.bf16_decode_attention(q, k, v, mask)).float().mean().item()
        print(f"| {length} | {torch_us:.0f} | {kernel_us:.0f} | {torch_us / kernel_us:.2f} | {equal:.4f} |")


def decode_steps(preset: str, mode: str, rounds: int) -> None:
    """Median decode-step milliseconds with torch's attention and with the kernel, eager and compiled."""
    model = init_weights(Llama(PRESETS[preset])).to(torch.bfloat16).eval()
    if mode != "bf16":
        quantize_model(model, mode)
    use_bf16_kernel(model)
    attention = [layer.self_attn for layer in model.model.layers]
    kernel = attention[0].attend_cache

    def use_kernel(on: bool) -> None:
        for module in attention:
            if on:
                module.attend_cache = kernel
            else:
                vars(module).pop("attend_cache", None)  # the class's torch version

    print(f"| {mode} decode step | torch attention ms | kernel ms | torch / kernel | rounds the kernel won |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for compiled in (False, True):
        decoder = Decoder(model, compile=compiled)
        cache = model.new_kv_cache(1, 512)
        steps: dict[bool, list[float]] = {False: [], True: []}
        with torch.inference_mode():
            model(torch.randint(0, model.config.vocab_size, (1, 128)), torch.arange(128)[None], cache)
            for on in (False, True):  # warm-up (and compiling) of each side
                use_kernel(on)
                for _ in range(3):
                    decoder(torch.tensor([5]), torch.tensor([128]), cache, 129)
            for _ in range(rounds):
                for on in (False, True):
                    use_kernel(on)
                    token, times = torch.tensor([5]), []
                    for i in range(20):
                        started = time.perf_counter()
                        token = decoder(token, torch.tensor([128 + i]), cache, 129 + i).argmax(-1)
                        times.append(time.perf_counter() - started)
                    steps[on].append(statistics.median(times))
        off, on = statistics.median(steps[False]) * 1e3, statistics.median(steps[True]) * 1e3
        won = sum(b < a for a, b in zip(steps[False], steps[True], strict=True))
        print(f"| {'compiled' if compiled else 'eager'} | {off:.1f} | {on:.1f} | {off / on:.2f} | {won} of {rounds} |")
    use_kernel(True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=50, help="alternating calls per side and length")
    parser.add_argument("--lengths", default="170,1024,4096", help="cached tokens, comma-separated")
    parser.add_argument("--chunk", type=int, default=256, help="queries of the prompt-chunk case (0: skip)")
    parser.add_argument("--chunk-lengths", default="256,512,1024,2048", help="its cached tokens, comma-separated")
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS), help="model of the step")
    parser.add_argument("--mode", default="int4", choices=("bf16", "int8", "int4"), help="weights of the step")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds of 20 decode steps (0: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if kernels.native_bf16() is None:
        raise SystemExit("the bfloat16 kernel does not run here (it needs AVX-512 BF16 or AVX2 and a C compiler)")
    one_layer([int(n) for n in args.lengths.split(",")], args.calls)
    if args.chunk:
        print()
        one_layer([int(n) for n in args.chunk_lengths.split(",")], max(args.calls // 5, 3), args.chunk)
    if args.rounds:
        print()
        decode_steps(args.preset, args.mode, args.rounds)


if __name__ == "__main__":
    main()
