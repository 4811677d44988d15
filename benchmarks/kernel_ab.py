"""A/B of edits to the C kernels in one process: decode steps, a prefill, or one kernel call, each version built and run
alternately.

This machine's speed moves by tens of percent from minute to minute, so a kernel change is only measured against
the code before it in the same process: this builds the current kernels (base) and each variant (the same sources
with text replaced) into their own libraries, then alternates them round by round on one model, swapping the
libraries llamaforge calls (quantize/kernels.py's native, native_bf16, native_decode). It also says whether each
variant's result (the logits, or the call's output) equals base's to the bit (most kernel changes must keep it).

A variants file is Python defining VARIANTS = {"name": [(source file, old text, new text), ...]}, the files being
those of llamaforge/quantize (qlinear.c, bf16linear.c, decode_layers.c). docs/benchmarks.md's kernel experiments
(one weight row at a time, prefetching, eight activation rows a tile) are such edits.

    python benchmarks/kernel_ab.py my_variants.py --mode int4            # fused decode steps, TinyLlama's shape
    python benchmarks/kernel_ab.py my_variants.py --mode int4 --prefill 128
    python benchmarks/kernel_ab.py my_variants.py --mode int8 --linear 5632,2048,128   # one N x K layer, 128 rows
    python benchmarks/kernel_ab.py my_variants.py --mode q4_k --linear 5632,2048,1     # a GGUF k-quant layer
    python benchmarks/kernel_ab.py my_variants.py --attention 512,512  # 512 queries over 512 cached positions
    python benchmarks/kernel_ab.py my_variants.py --gguf model.Q4_K_M.gguf --prefill 128  # a file's model, as loaded

A single call's weights (or cache) stay in the caches between calls unless they are larger than them: pick shapes
for what the change is about (arithmetic: cache-resident; streaming: larger than the L3).
"""

from __future__ import annotations  # noqa: I001 (llamaforge before torch, below)

# Before torch: llamaforge asks it for huge pages, as every llamaforge command has them (llamaforge/hugepages.py).
import llamaforge  # noqa: F401

import argparse
import ctypes
import json
import runpy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import model_in_mode  # noqa: E402  (the model as llamaforge.load makes it in each mode)

from llamaforge.config import PRESETS, ModelArgs  # noqa: E402
from llamaforge.model import KVCache, Llama, init_weights  # noqa: E402
from llamaforge.quantize import kernels, quantize_weight  # noqa: E402
from llamaforge.quantize.formats import from_gguf_q4_k, from_gguf_q5_k, from_gguf_q6_k  # noqa: E402

# GGUF k-quants a --linear call can time (random blocks): the loader, the block's bytes, where its float16 factors are
K_QUANTS = {"q4_k": (from_gguf_q4_k, 144, slice(0, 4)), "q5_k": (from_gguf_q5_k, 176, slice(0, 4)),
            "q6_k": (from_gguf_q6_k, 210, slice(208, 210))}

SOURCES = Path(kernels.__file__).parent
LOADERS = kernels.LIBRARIES  # loader name: (source, its AVX-512 build's CPU and compiler flags, includes)


def build_version(edits: list[tuple[str, str, str]], directory: Path) -> dict[str, ctypes.CDLL]:
    """The three kernel libraries built from the sources with `edits` applied, typed as llamaforge's are (those whose
    sources no edit names are llamaforge's own, built once in its cache)."""
    directory.mkdir(parents=True)
    edited = {name for name, _, _ in edits}
    unknown = edited - {path.name for path in SOURCES.glob("*.c")}
    if unknown:  # the headers are forced in from the package (kernels.build_flags), never from a copy
        raise SystemExit(f"edits can name only the kernels' .c sources, not {', '.join(sorted(unknown))}")
    for path in SOURCES.glob("*.c"):
        text = path.read_text()
        for name, old, new in edits:
            if name == path.name:
                if old not in text:
                    raise SystemExit(f"{name}: the text to replace is not there: {old[:80]!r}")
                text = text.replace(old, new)
        (directory / path.name).write_text(text)
    libraries = {}
    for loader, (source, cpu_flags, flags, includes) in LOADERS.items():
        if not edited & {source.name, *(path.name for path in includes)}:
            libraries[loader] = getattr(kernels, loader)()  # the sources as they are: llamaforge's own build
            continue
        flags, headers = kernels.build_flags(cpu_flags, flags)  # this CPU's build, as llamaforge makes it
        library = ctypes.CDLL(str(kernels.build(directory / source.name, directory, flags,
                                                (*(directory / path.name for path in includes), *headers))))
        for name, function in vars(getattr(kernels, loader)()).items():  # the functions llamaforge typed
            if isinstance(function, ctypes._CFuncPtr):
                getattr(library, name).argtypes, getattr(library, name).restype = function.argtypes, function.restype
        libraries[loader] = library
    return libraries


def use(libraries: dict[str, ctypes.CDLL]) -> None:
    """Make llamaforge call these libraries."""
    for loader, library in libraries.items():
        setattr(kernels, loader, lambda library=library: library)


def shape(count: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: `count` positive integers separated by commas."""
    def parse(text: str) -> tuple[int, ...]:
        parts = text.split(",")
        if len(parts) != count or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(f"expected {count} positive integers separated by commas, got {text!r}")
        return tuple(int(part) for part in parts)
    return parse


def linear_call(mode: str, N: int, K: int, M: int) -> Callable[[], torch.Tensor]:
    """One call of the linear kernel of `mode` on a random N x K weight and M bfloat16 rows: its output."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(N, K, generator=generator) * 0.02
    x = torch.randn(M, K, generator=generator).to(torch.bfloat16)
    if mode == "bf16":
        weight = weight.to(torch.bfloat16)
        return lambda: kernels.bf16_linear(x, weight)
    if mode in K_QUANTS:  # random blocks (any bytes are codes and scales) under small float16 factors
        loader, size, factors = K_QUANTS[mode]
        raw = torch.randint(0, 256, (N, K // 256, size), dtype=torch.uint8, generator=generator)
        count = (factors.stop - factors.start) // 2  # float16 factors: d (and dmin)
        raw[..., factors] = (torch.rand(N, K // 256, count, generator=generator) * 1e-3).half().view(torch.uint8)
        q = loader(raw.reshape(N, -1), (N, K))
        return lambda: kernels.qlinear(x, q)
    q = quantize_weight(weight, 8 if mode == "int8" else 4, None if mode == "int8" else 32)
    return lambda: kernels.qlinear(x, q)


def attention_call(config: ModelArgs, T: int, L: int) -> Callable[[], torch.Tensor]:
    """One call of the attention kernel: the last T of L cached positions (causal) as queries, `config`'s heads."""
    generator = torch.Generator().manual_seed(0)
    cache = KVCache.allocate(1, L, config.n_kv_heads, config.head_dim, torch.bfloat16, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=generator))
    cache.v.copy_(torch.randn(cache.v.shape, generator=generator))
    q = torch.randn(1, config.n_heads, T, config.head_dim, generator=generator).to(torch.bfloat16)
    mask = (torch.arange(L)[None, :] <= torch.arange(L - T, L)[:, None])[None, None]  # (1, 1, T, L)
    return lambda: kernels.bf16_cache_attention(q, cache.k, cache.v, cache.offsets(), mask)


def workload(args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """One decode step (all layers and the output layer), one prefill of `args.prefill` tokens (their logits), or one
    call of a linear or the attention kernel (its output)."""
    config = PRESETS[args.preset]
    if args.linear:
        return linear_call(args.mode, *args.linear)
    if args.attention:
        return attention_call(config, *args.attention)
    if args.gguf:
        model = llamaforge.load(args.gguf).model  # as decode.py's file modes run it
        config = model.config
    else:
        model = model_in_mode(init_weights(Llama(config), seed=0).eval(), args.mode)
    positions = max(256, args.prefill + 1)
    caches = [KVCache.allocate(1, positions, config.n_kv_heads, config.head_dim, torch.bfloat16, "cpu")
              for _ in range(config.n_layers)]
    if args.prefill:
        ids = torch.randint(3, config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(0))
        last = torch.tensor([args.prefill - 1])
        return lambda: model(ids, torch.arange(args.prefill)[None], caches, logits_at=last)
    if model.fused_decode is None:
        raise SystemExit("the fused decode layers do not run here (they need AVX-512 or AVX2); use --prefill")
    token, position = torch.tensor([5]), torch.tensor([160])
    return lambda: model.fused_decode(token, position, caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", help="a Python file defining VARIANTS (see above)")
    parser.add_argument("--mode", default="int4", choices=["bf16", "int8", "int4", *K_QUANTS],
                        help="the model's weights (the k-quants: with --linear only)")
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--gguf", type=Path, help="decode or prefill this GGUF file's model (as llamaforge.load "
                        "makes it) instead of random weights in --preset's shape and --mode")
    what = parser.add_mutually_exclusive_group()  # the workload; a decode step without any
    what.add_argument("--prefill", type=int, default=0, help="time a prefill of this many tokens, not decode")
    what.add_argument("--linear", type=shape(3), metavar="N,K,M",
                      help="time one call of the --mode linear kernel: an N x K weight, M activation rows")
    what.add_argument("--attention", type=shape(2), metavar="T,L",
                      help="time one call of the attention kernel: T queries over L positions, --preset's heads")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported")
    parser.add_argument("--calls", type=int, default=6, help="calls a round (the round counts their median)")
    parser.add_argument("--threads", type=int, default=2, help="threads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    if args.gguf and (args.linear or args.attention):
        parser.error("--gguf runs a file's model: give --prefill N or nothing (a decode step)")
    if args.mode in K_QUANTS and not args.gguf and not (args.linear and args.linear[1] % 256 == 0):
        parser.error(f"--mode {args.mode} times one layer: give --linear N,K,M with K a multiple of 256")
    if kernels.native() is None or kernels.native_bf16() is None or kernels.native_decode() is None:
        raise SystemExit("the kernels do not build or run on this machine (AVX-512 or AVX2, a C compiler)")
    torch.set_num_threads(args.threads)
    variants = {"base": [], **runpy.run_path(args.variants)["VARIANTS"]}
    with tempfile.TemporaryDirectory(prefix="llamaforge-kernel-ab-") as scratch:
        versions = {name: build_version(edits, Path(scratch) / name) for name, edits in variants.items()}
        run = workload(args)
        seconds: dict[str, list[float]] = {name: [] for name in versions}
        with torch.inference_mode():
            results = {}
            for name, libraries in versions.items():
                use(libraries)
                results[name] = run()
            for round_ in range(args.rounds):
                order = list(versions.items())
                for name, libraries in order if round_ % 2 == 0 else reversed(order):
                    use(libraries)
                    calls = []
                    for _ in range(args.calls):
                        started = time.perf_counter()
                        run()
                        calls.append(time.perf_counter() - started)
                    seconds[name].append(statistics.median(calls))
    base_ms = statistics.median(seconds["base"]) * 1e3
    rows = [{"variant": name, "ms": statistics.median(s) * 1e3, "rounds_ms": [x * 1e3 for x in s],
             "vs_base": base_ms / (statistics.median(s) * 1e3),
             "same_result": bool(torch.equal(results[name], results["base"]))} for name, s in seconds.items()]
    if args.json:
        print(json.dumps({"mode": args.mode, "preset": args.preset, "gguf": args.gguf and str(args.gguf),
                          "prefill": args.prefill, "linear": args.linear,
                          "attention": args.attention, "rows": rows}))
        return
    what = (f"{args.mode} linear {'x'.join(map(str, args.linear[:2]))}, {args.linear[2]} rows" if args.linear
            else f"attention of {args.attention[0]} queries over {args.attention[1]} positions, {args.preset}'s heads"
            if args.attention else (args.gguf.name if args.gguf else f"{args.mode} {args.preset}")
            + (f" prefill of {args.prefill} tokens" if args.prefill else " decode step"))
    print(f"{what}, {args.threads} threads, median of {args.rounds} alternating rounds")
    print("| variant | ms | rounds | speed vs base | result equal base's |")
    print("| --- | ---: | --- | ---: | --- |")
    for row in rows:
        spread = f"{min(row['rounds_ms']):.4g}-{max(row['rounds_ms']):.4g}"
        print(f"| {row['variant']} | {row['ms']:.4g} | {spread} | {row['vs_base']:.3f} | {row['same_result']} |")


if __name__ == "__main__":
    main()
