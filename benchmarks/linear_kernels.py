"""One linear layer at batch 1: llamaforge's int8 / int4 / bf16 kernels against torch's own CPU kernels.

For two TinyLlama-1.1B weight shapes (32000 x 2048, its output projection, larger than any cache; 5632 x 2048, an
FFN projection), each candidate multiplies one bfloat16 activation row by the weight; GB/s is the weight bytes
the candidate reads divided by its median time. Decoding reads every weight once a token, so this is the figure
that bounds decode speed.

    python benchmarks/linear_kernels.py            # as root, `chrt -f 10` first keeps other load off the cores
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| weight | kernel | ms (min-max) | GB/s |")
    print("| --- | --- | ---: | ---: |")
    for shape in ((32000, 2048), (5632, 2048)):
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
        x = torch.randn(1, shape[1]).bfloat16()
        for name, run, nbytes in candidates(weight, x):
            median, low, high = bench(run, args.repeats)
            print(f"| {shape[0]}x{shape[1]} | {name} | {median * 1e3:.2f} ({low * 1e3:.2f}-{high * 1e3:.2f}) | "
                  f"{nbytes / median / 1e9:.1f} |")


if __name__ == "__main__":
    main()
