"""This machine's ceilings, measured: memory read bandwidth and int8 / bfloat16 dot-product throughput.

Batch-1 decoding reads every weight once a token, so no implementation decodes faster than the memory read
bandwidth allows; a prompt's tokens share each weight read, so prefill is bounded by the dot-product throughput
(int8 VPDPBUSD for int8 / int4 weights, bfloat16 VDPBF16PS for bfloat16 ones). benchmarks/decode.py measures these
in the same run as the implementations and reports how close each side comes; they tell which speed ratio is
still possible on a machine (docs/benchmarks.md).

The C (ceilings.c) is built like llamaforge's kernels, for AVX-512 VNNI and BF16 or for AVX2 (where the dot products
are the instructions the kernels use instead); elsewhere, and with the kernels emulated, `Ceilings.load()` is None.

    python benchmarks/ceilings.py --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

import torch

from llamaforge.quantize import kernels

SOURCE = Path(__file__).with_name("ceilings.c")
CHAINS, INT8_MACS, BF16_MACS = 12, 64, 32  # ceilings.c's accumulators; multiply-adds per instruction


class Ceilings:
    """The compiled measurements (ceilings.c), called with `threads` threads."""

    def __init__(self, library: ctypes.CDLL, threads: int) -> None:
        self.library, self.threads = library, threads
        library.read_words.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        library.read_words.restype = ctypes.c_uint32
        library.int8_dots.argtypes = library.bf16_dots.argtypes = [ctypes.c_int64, ctypes.c_int]
        library.int8_dots.restype = ctypes.c_int64
        library.bf16_dots.restype = ctypes.c_double
        self._buffer: torch.Tensor | None = None

    @classmethod
    def load(cls, threads: int) -> Ceilings | None:
        """The measurements, built as the kernels are for this CPU; None where they are not built (no AVX-512 or AVX2,
        or emulated: nothing to measure) or there is no C compiler."""
        if kernels.instruction_set() not in ("avx512", "avx2"):
            return None
        try:
            return cls(kernels.load(SOURCE, kernels.DECODE_CPU_FLAGS, kernels.DECODE_COMPILE_FLAGS), threads)
        except (RuntimeError, OSError):
            return None

    def read_words(self, data: torch.Tensor) -> int:
        """The wrapping sum of `data`'s 32-bit words (a contiguous CPU tensor of a multiple of 256 bytes), read on
        every thread."""
        return self.library.read_words(data.data_ptr(), data.numel() * data.element_size(), self.threads)

    def int8_dots(self, rounds: int) -> int:
        """Run rounds x 12 VPDPBUSD (or their AVX2 equivalent) per thread; what they summed."""
        return self.library.int8_dots(rounds, self.threads)

    def bf16_dots(self, rounds: int) -> float:
        """Run rounds x 12 VDPBF16PS (or their AVX2 equivalent) per thread; what they summed."""
        return self.library.bf16_dots(rounds, self.threads)

    def read_gb_s(self, megabytes: int = 1024, repeats: int = 3) -> float:
        """Median GB/s of reading a buffer far larger than the caches (filled once, kept between calls)."""
        size = megabytes << 20
        if self._buffer is None or self._buffer.numel() != size:
            self._buffer = torch.ones(size, dtype=torch.uint8)
        return _median_rate(lambda: self.read_words(self._buffer), size / 1e9, repeats)

    def int8_gmac_s(self, rounds: int = 2_000_000, repeats: int = 3) -> float:
        """Median int8 multiply-adds per second (billions) on all threads."""
        return _median_rate(lambda: self.int8_dots(rounds), rounds * CHAINS * INT8_MACS * self.threads / 1e9, repeats)

    def bf16_gmac_s(self, rounds: int = 2_000_000, repeats: int = 3) -> float:
        """Median bfloat16 multiply-adds per second (billions) on all threads."""
        return _median_rate(lambda: self.bf16_dots(rounds), rounds * CHAINS * BF16_MACS * self.threads / 1e9, repeats)


def _median_rate(run, work: float, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        rates.append(work / (time.perf_counter() - started))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads to measure with")
    args = parser.parse_args(argv)
    ceilings = Ceilings.load(args.threads)
    if ceilings is None:
        raise SystemExit("ceilings.py needs an x86-64 CPU with AVX-512 (VNNI, BF16) or AVX2 and a C compiler")
    print(json.dumps({"threads": args.threads, "read_gb_s": ceilings.read_gb_s(),
                      "int8_gmac_s": ceilings.int8_gmac_s(), "bf16_gmac_s": ceilings.bf16_gmac_s()}, indent=2))


if __name__ == "__main__":
    main()
