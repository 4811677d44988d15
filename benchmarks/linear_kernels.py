"""One linear layer at batch 1: llamaforge's int8 / int4 / bf16 kernels against torch's own CPU kernels.

For two TinyLlama-1.1B weight shapes (32000 x 2048, its output projection; 5632 x 2048, an FFN projection), each
candidate multiplies one bfloat16 activation row by the weight; GB/s is the weight bytes the candidate reads
divided by its median time. Decoding reads every weight once a token, so this is the figure that bounds decode
speed. One weight called again and again stays partly in the CPU's last-level cache (32 MB here, as large as the
int4 output projection), so `--step` also times a whole decode step's linear layers: every weight of the 22
layers and the output projection, each a separate tensor, called in model order (q, k and v in one call where the
kernel takes several weights, gate and up likewise), which streams them from memory as decoding does.

    python benchmarks/linear_kernels.py            # as root, `chrt -f 10` first keeps other load off the cores
    python benchmarks/linear_kernels.py --rows 4,8,16,64,512   # the bf16 kernel on many rows against torch's GEMM

`--rows` times the bfloat16 kernel and torch's bfloat16 GEMM side by side (alternating, medians of 5 rounds) on
activation rows of each count, for the FFN's two shapes: what a batched decode step (up to 16 rows take the kernel)
and a prompt's chunk cost; GMAC/s = rows x N x K / time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llamaforge.quantize import kernels, quantize_weight


def bench(run: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float, float]:
    """Median, min and max seconds of `repeats` calls after 5 warm-up calls."""
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), max(times)


def candidates(weight: torch.Tensor, x: torch.Tensor) -> list[tuple[str, Callable[[], torch.Tensor], int]]:
    """(name, call, weight bytes it reads) for every kernel that runs here."""
    N, K = weight.shape
    dense16 = weight.bfloat16()
    rows = [("torch F.linear bf16", lambda: F.linear(x, dense16), dense16.nbytes),
            ("torch F.linear fp32", lambda: F.linear(x.float(), weight), weight.nbytes)]
    scale = weight.abs().amax(1, keepdim=True) / 127
    int8 = (weight / scale).round().to(torch.int8)
    rows.append(("torch _weight_int8pack_mm (per row)",
                 lambda: torch._weight_int8pack_mm(x, int8, scale[:, 0].bfloat16()), int8.nbytes + 2 * N))
    codes = (weight / (weight.abs().amax(1, keepdim=True) / 7)).round().clamp(-8, 7).to(torch.int32) + 8
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_zeros = torch.zeros(K // 32, N, 2, dtype=torch.bfloat16)
    rows.append(("torch _weight_int4pack_mm_for_cpu (g32)",
                 lambda: torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros),
                 N * K // 2 + scales_zeros.nbytes))
    if kernels.native() is not None:
        q8, q4 = quantize_weight(weight, 8), quantize_weight(weight, 4, 32)
        rows.append(("llamaforge int8 (per row)", lambda: kernels.qlinear(x, q8), q8.nbytes))
        rows.append(("llamaforge int4 (g32)", lambda: kernels.qlinear(x, q4), q4.nbytes))
    if kernels.native_bf16() is not None:
        rows.append(("llamaforge bf16", lambda: kernels.bf16_linear(x, dense16), dense16.nbytes))
    return rows


# One TinyLlama-1.1B layer's linear weights in model order, grouped as the model calls them.
LAYER_GROUPS = (((2048, 2048), (256, 2048), (256, 2048)), ((2048, 2048),), ((5632, 2048), (5632, 2048)),
                ((2048, 5632),))
LAYERS = 22


def step_candidates(layers: int) -> list[tuple[str, Callable[[], None], int]]:
    """(name, one decode step's linear layers, bytes they read) for the kernels that run here."""
    generator = torch.Generator().manual_seed(0)
    shapes = [group for _ in range(layers) for group in LAYER_GROUPS] + [((32000, 2048),)]
    dense, int8, int4 = [], [], []
    for group in shapes:  # each float32 weight lives only until its copies exist
        weights = [torch.randn(*shape, generator=generator) * 0.02 for shape in group]
        dense.append([w.bfloat16() for w in weights])
        if kernels.native() is not None:
            int8.append([quantize_weight(w, 8) for w in weights])
            # As quantize_model does: int4 keeps the output projection in int8.
            int4.append([quantize_weight(w, 8) if w.shape[0] == 32000 else quantize_weight(w, 4, 32) for w in weights])
    inputs = {2048: torch.randn(1, 2048).bfloat16(), 5632: torch.randn(1, 5632).bfloat16()}
    dense_bytes = sum(w.nbytes for g in dense for w in g)
    rows = [("torch F.linear bf16", lambda: [F.linear(inputs[w.shape[1]], w) for g in dense for w in g], dense_bytes)]
    if kernels.native_bf16() is not None:
        rows.append(("llamaforge bf16", lambda: [kernels.bf16_linear(inputs[w.shape[1]], w) for g in dense for w in g],
                     dense_bytes))
    for name, quantized in (("llamaforge int8 (per row)", int8), ("llamaforge int4 (g32, output int8)", int4)):
        if quantized:
            rows.append((name, lambda q=quantized: [kernels.qlinear_many(inputs[g[0].in_features], g) for g in q],
                         sum(w.nbytes for g in quantized for w in g)))
    return rows


def many_rows(counts: list[int], repeats: int) -> None:
    """The bfloat16 kernel against torch's bfloat16 GEMM at each row count, alternating, as a Markdown table."""
    print("| rows | weight | llamaforge bf16 ms | torch bf16 ms | GMAC/s ours / torch | torch / ours time |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for count in counts:
        for N, K in ((5632, 2048), (2048, 5632)):
            generator = torch.Generator().manual_seed(0)
            weight = (torch.randn(N, K, generator=generator) * 0.02).bfloat16()
            x = torch.randn(count, K, generator=generator).bfloat16()
            calls = max(repeats // max(count // 16, 1), 3)
            times: dict[str, list[float]] = {"ours": [], "torch": []}
            for _ in range(5):
                times["ours"].append(bench(lambda x=x, w=weight: kernels.bf16_linear(x, w), calls)[0])
                times["torch"].append(bench(lambda x=x, w=weight: F.linear(x, w), calls)[0])
            ours, theirs = statistics.median(times["ours"]), statistics.median(times["torch"])
            macs = count * N * K
            print(f"| {count} | {N}x{K} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {macs / ours / 1e9:.0f} / "
                  f"{macs / theirs / 1e9:.0f} | {theirs / ours:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--step", action="store_true", help="also time a whole decode step's linear layers")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers in --step (TinyLlama: 22)")
    parser.add_argument("--rows", help="comma-separated row counts: only the bf16 kernel against torch's GEMM on them")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rows:
        if kernels.native_bf16() is None:
            raise SystemExit("the bfloat16 kernel does not run here (it needs AVX-512 BF16 or AVX2 and a C compiler)")
        many_rows([int(count) for count in args.rows.split(",")], args.repeats)
        return
    print("| weight | kernel | ms (min-max) | GB/s |")
    print("| --- | --- | ---: | ---: |")
    if args.step:
        for name, run, nbytes in step_candidates(args.layers):
            median, low, high = bench(run, max(args.repeats // 3, 3))
            print(f"| decode step ({args.layers} layers + output) | {name} | {median * 1e3:.2f} "
                  f"({low * 1e3:.2f}-{high * 1e3:.2f}) | {nbytes / median / 1e9:.1f} |")
    for shape in ((32000, 2048), (5632, 2048)):
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
        x = torch.randn(1, shape[1]).bfloat16()
        for name, run, nbytes in candidates(weight, x):
            median, low, high = bench(run, args.repeats)
            print(f"| {shape[0]}x{shape[1]} | {name} | {median * 1e3:.2f} ({low * 1e3:.2f}-{high * 1e3:.2f}) | "
                  f"{nbytes / median / 1e9:.1f} |")


if __name__ == "__main__":
    main()
