"""A/B of edits to the C kernels in one process: decode steps or a prefill, each version built and run alternately.

This machine's speed moves by tens of percent from minute to minute, so a kernel change is only measured against
the code before it in the same process: this builds the current kernels (base) and each variant (the same sources
with text replaced) into their own libraries, then alternates them round by round on one model, swapping the
libraries llamaforge calls (quantize/kernels.py's native, native_bf16, native_decode). It also says whether each
variant's logits equal base's to the bit (most kernel changes must keep them).

A variants file is Python defining VARIANTS = {"name": [(source file, old text, new text), ...]}, the files being
those of llamaforge/quantize (qlinear.c, bf16linear.c, decode_layers.c). docs/benchmarks.md's kernel experiments
(one weight row at a time, prefetching, eight activation rows a tile) are such edits.

    python benchmarks/kernel_ab.py my_variants.py --mode int4            # fused decode steps, TinyLlama's shape
    python benchmarks/kernel_ab.py my_variants.py --mode int4 --prefill 128
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

from llamaforge.config import PRESETS  # noqa: E402
from llamaforge.model import KVCache, Llama, init_weights  # noqa: E402
from llamaforge.quantize import kernels  # noqa: E402

SOURCES = Path(kernels.__file__).parent
# kernels.py's library loaders: (source, its AVX-512 build's CPU and compiler flags, sources it includes)
LOADERS = {"native": (kernels.SOURCE, kernels.CPU_FLAGS, kernels.COMPILE_FLAGS, ()),
           "native_bf16": (kernels.BF16_SOURCE, kernels.BF16_CPU_FLAGS, kernels.BF16_COMPILE_FLAGS, ()),
           "native_decode": (kernels.DECODE_SOURCE, kernels.DECODE_CPU_FLAGS, kernels.DECODE_COMPILE_FLAGS,
                             (kernels.SOURCE, kernels.BF16_SOURCE))}


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


def workload(args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """One decode step (all layers and the output layer) or one prefill of `args.prefill` tokens: its logits."""
    config = PRESETS[args.preset]
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
    parser.add_argument("--mode", default="int4", choices=["bf16", "int8", "int4"], help="the model's weights")
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--prefill", type=int, default=0, help="time a prefill of this many tokens, not decode")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported")
    parser.add_argument("--calls", type=int, default=6, help="calls a round (the round counts their median)")
    parser.add_argument("--threads", type=int, default=2, help="threads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    if kernels.native() is None or kernels.native_bf16() is None or kernels.native_decode() is None:
        raise SystemExit("the kernels do not build or run on this machine (AVX-512 or AVX2, a C compiler)")
    torch.set_num_threads(args.threads)
    variants = {"base": [], **runpy.run_path(args.variants)["VARIANTS"]}
    with tempfile.TemporaryDirectory(prefix="llamaforge-kernel-ab-") as scratch:
        versions = {name: build_version(edits, Path(scratch) / name) for name, edits in variants.items()}
        run = workload(args)
        seconds: dict[str, list[float]] = {name: [] for name in versions}
        with torch.inference_mode():
            logits = {}
            for name, libraries in versions.items():
                use(libraries)
                logits[name] = run()
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
             "same_logits": bool(torch.equal(logits[name], logits["base"]))} for name, s in seconds.items()]
    if args.json:
        print(json.dumps({"mode": args.mode, "preset": args.preset, "prefill": args.prefill, "rows": rows}))
        return
    what = f"prefill of {args.prefill} tokens" if args.prefill else "decode step"
    print(f"{args.mode} {args.preset} {what}, {args.threads} threads, median of {args.rounds} alternating rounds")
    print("| variant | ms | rounds | speed vs base | logits equal base's |")
    print("| --- | ---: | --- | ---: | --- |")
    for row in rows:
        spread = f"{min(row['rounds_ms']):.1f}-{max(row['rounds_ms']):.1f}"
        print(f"| {row['variant']} | {row['ms']:.2f} | {spread} | {row['vs_base']:.3f} | {row['same_logits']} |")


if __name__ == "__main__":
    main()
