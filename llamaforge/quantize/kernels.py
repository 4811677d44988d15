"""The C kernels (int8 / int4 and bfloat16 linears, attention over the KV cache, fused decode layers), built for this
CPU on first use, or plain torch where they cannot be.

They need x86-64 with AVX-512 (F, BW, VL, with VNNI for int8 / int4 and BF16 for bfloat16) or, built from the same
sources with `avx2_vectors.h`, AVX2 with FMA and F16C; and a C compiler. Each library is compiled once per source,
flags and compiler into llamaforge's cache folder (`$XDG_CACHE_HOME/llamaforge/kernels`, else `~/.cache/...`) and
loaded with ctypes, which releases the GIL while it runs. Anywhere else, and with LLAMAFORGE_KERNELS=0, torch runs
the layers: an int8 / int4 weight is dequantized and multiplied, the same weights, slower, with unquantized
activations. LLAMAFORGE_KERNELS=avx2 builds the AVX2 libraries on a CPU with AVX-512 too (to test them there).

`qlinear_reference` is the kernel's arithmetic written in torch (activations quantized to int8 in blocks
of 32, or of 256 as llama.cpp's Q8_K against the k-quants, integer dot products, then the scales), which the tests hold
the compiled kernel to.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llamaforge.model import KVCache
from llamaforge.quantize.formats import (
    BIAS,
    BLOCK,
    GGUF_SCHEMES,
    K_QUANT_SCHEMES,
    Q4_K_BYTES,
    Q5_K_BYTES,
    Q6_K_BYTES,
    Q6_K_SUPER_BYTES,
    STORED_Q4_K_BYTES,
    STORED_Q6_K_BYTES,
    SUPER_BLOCK,
    SUPER_BYTES,
    TILE,
    WITH_MINS,
    QuantizedWeight,
    check_scheme,
    dequantize_weight,
    from_gguf,
    from_stored,
    group_width,
    quantize_weight,
    stored_width,
    unpack_codes,
)

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qlinear.c")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")
COMPILE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                 "-mf16c", "-mfma")
# The bfloat16 kernel is its own library: built with AVX-512 BF16 enabled, it must never load on a CPU without it.
BF16_SOURCE = Path(__file__).with_name("bf16linear.c")
BF16_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
BF16_COMPILE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
# The fused decode layers include both kernels' sources, so they need both instruction sets.
DECODE_SOURCE = Path(__file__).with_name("decode_layers.c")
DECODE_CPU_FLAGS = tuple(dict.fromkeys(CPU_FLAGS + BF16_CPU_FLAGS))
DECODE_COMPILE_FLAGS = tuple(dict.fromkeys(COMPILE_FLAGS + BF16_COMPILE_FLAGS))
# CPUs with AVX2 but no AVX-512 (AMD Zen 2 and 3, most Intel desktop parts) build the same sources with this header
# forced in: each 512-bit operation as two 256-bit ones, and the byte dot products as AVX2 can do them.
AVX2_HEADER = Path(__file__).with_name("avx2_vectors.h")
AVX2_CPU_FLAGS = ("avx2", "fma", "f16c")
AVX2_COMPILE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-Wno-psabi",
                      "-DLLAMAFORGE_AVX2", "-include", str(AVX2_HEADER))
# LLAMAFORGE_KERNELS=emulate (tests only): build every kernel with its AVX-512 instructions emulated by SIMDe, so a
# CPU without AVX-512 runs the kernels' code under the tests. Slow: never for measurement. (=0: no kernels at all.)
EMULATION_HEADER = Path(__file__).with_name("avx512_emulation.h")
# -march=native: SIMDe then emulates each instruction with this CPU's own (fused multiply-adds stay fused).
EMULATION_FLAGS = ("-O2", "-march=native", "-shared", "-fPIC", "-fopenmp", "-Wno-psabi", "-DLLAMAFORGE_EMULATE_AVX512",
                   "-include", str(EMULATION_HEADER))
_INT64, _PTR = ctypes.c_int64, ctypes.c_void_p
# Each library's loader: its source, the CPU flags and compiler flags of its AVX-512 build, the sources it includes.
LIBRARIES = {"native": (SOURCE, CPU_FLAGS, COMPILE_FLAGS, ()),
             "native_bf16": (BF16_SOURCE, BF16_CPU_FLAGS, BF16_COMPILE_FLAGS, ()),
             "native_decode": (DECODE_SOURCE, DECODE_CPU_FLAGS, DECODE_COMPILE_FLAGS, (SOURCE, BF16_SOURCE))}


def cache_dir() -> Path:
    """Where built kernels are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamaforge" / "kernels"


def emulated() -> bool:
    """Whether the kernels are built emulated (LLAMAFORGE_KERNELS=emulate: tests on a CPU without AVX-512)."""
    return os.environ.get("LLAMAFORGE_KERNELS") == "emulate"


def instruction_set(cpu_flags: tuple[str, ...] = DECODE_CPU_FLAGS) -> str | None:
    """Which build of a library needing `cpu_flags` (its AVX-512 sets) runs here: "avx512", "avx2", "emulated" (tests
    only), or None (no kernels: LLAMAFORGE_KERNELS=0, or a CPU with neither)."""
    choice = os.environ.get("LLAMAFORGE_KERNELS", "1")
    if choice == "0":
        return None
    if emulated():
        return "emulated"
    if choice != "avx2" and not missing_cpu_flags(cpu_flags):
        return "avx512"
    return None if missing_cpu_flags(AVX2_CPU_FLAGS) else "avx2"


def build_flags(cpu_flags: tuple[str, ...],
                flags: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[Path, ...]] | None:
    """The compiler flags of the build of a library that runs here (`instruction_set(cpu_flags)`), `flags` being its
    AVX-512 build's, and the headers they force in; None where none runs."""
    isa = instruction_set(cpu_flags)
    if isa == "emulated":
        return EMULATION_FLAGS, (EMULATION_HEADER,)
    if isa == "avx2":
        return AVX2_COMPILE_FLAGS, (AVX2_HEADER,)
    return None if isa is None else (flags, ())


def load(source: Path, cpu_flags: tuple[str, ...], flags: tuple[str, ...],
         includes: tuple[Path, ...] = ()) -> ctypes.CDLL | None:
    """Build (once) and load the build of a kernel library that runs here (see `build_flags`), `includes` being the
    sources it includes; None where none runs. RuntimeError or OSError when it cannot be built or loaded."""
    chosen = build_flags(cpu_flags, flags)
    if chosen is None:
        return None
    return ctypes.CDLL(str(build(source, flags=chosen[0], includes=(*includes, *chosen[1]))))


def _load_or_log(source: Path, cpu_flags: tuple[str, ...], flags: tuple[str, ...], includes: tuple[Path, ...],
                 without: str) -> ctypes.CDLL | None:
    """`load`, or None with the reason logged once: `without` says what runs instead."""
    build_all()
    try:
        library = load(source, cpu_flags, flags, includes)
    except (RuntimeError, OSError) as exc:
        log.warning("%s: %s", without, exc)
        return None
    if library is None and os.environ.get("LLAMAFORGE_KERNELS", "1") != "0":
        log.info("%s: this CPU has neither AVX-512 (%s) nor AVX2 with FMA and F16C", without, ", ".join(cpu_flags))
    return library


@cache
def build_all() -> None:
    """Compile every library that runs here side by side, before the first is loaded: a first run waited for three
    compilers in turn (6 + 3 + 1 s here; 6 s at once on two cores). A failure is left for its loader to report."""
    jobs = []
    for source, cpu_flags, flags, includes in LIBRARIES.values():
        chosen = build_flags(cpu_flags, flags)
        if chosen is not None:
            jobs.append((source, chosen[0], (*includes, *chosen[1])))
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        for job in [pool.submit(build, source, None, flags, includes) for source, flags, includes in jobs]:
            with contextlib.suppress(RuntimeError, OSError):
                job.result()


def cpu_flags() -> set[str]:
    """The instruction sets /proc/cpuinfo lists for this CPU (none where it cannot be read)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def missing_cpu_flags(needed: tuple[str, ...] = CPU_FLAGS) -> list[str]:
    """The instruction sets of `needed` that this CPU lacks (all of them off x86-64 Linux; none when emulated)."""
    if emulated():
        return []
    present = cpu_flags() if platform.machine() in ("x86_64", "AMD64") else set()
    return [flag for flag in needed if flag not in present]


def build(source: Path = SOURCE, directory: Path | None = None, flags: tuple[str, ...] = COMPILE_FLAGS,
          includes: tuple[Path, ...] = ()) -> Path:
    """Compile `source` into a shared library (once: the name hashes the source and the files it `includes`, the
    flags and the compiler); its path.

    Raises RuntimeError with the compiler's message when there is no compiler or it fails.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    # -march=native compiles for this CPU, so its library is this CPU's (a cache folder shared between machines).
    cpu = " ".join(sorted(cpu_flags())) if "-march=native" in flags else ""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in (source, *includes)) + " ".join(flags).encode()
                            + version.encode() + cpu.encode()).hexdigest()
    directory = directory or cache_dir()
    library = directory / f"{source.stem}-{digest[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: processes that build at once never load a half-written file.
    # Said, as a warning so that it shows without logging set up: a first run otherwise sits silent for 10-20 s.
    log.warning("llamaforge: compiling its %s kernels for this CPU (once; kept in %s)", source.stem, directory)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / library.name
        result = subprocess.run([compiler, *flags, "-o", str(partial), str(source)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} could not build {source.name}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    return library


@cache
def native() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (the reason logged once) where it cannot run."""
    library = _load_or_log(*LIBRARIES["native"], "int8/int4 layers use the slower torch fallback")
    if library is None:
        return None
    library.qlinear_many.argtypes = [_PTR, ctypes.c_int, _PTR, _PTR, _PTR, _PTR, _INT64, _INT64, ctypes.c_int, _INT64,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.qlinear_many.restype = ctypes.c_int
    library.dequantize.argtypes = [_PTR, _PTR, _PTR, _INT64, _INT64, ctypes.c_int, _INT64, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int]
    library.dequantize.restype = None
    library.repack_gguf.argtypes = [_PTR, _INT64, _INT64, _PTR, ctypes.c_int, ctypes.c_int, _PTR, _PTR, ctypes.c_int]
    library.repack_gguf.restype = ctypes.c_int
    library.quantize_rows.argtypes = [_PTR, ctypes.c_int, _INT64, _INT64, ctypes.c_int, _INT64, _PTR, _PTR,
                                      ctypes.c_int]
    library.quantize_rows.restype = ctypes.c_int
    library.repack_stored.argtypes = [_PTR, _INT64, _PTR, _INT64, _INT64, _INT64, ctypes.c_int, _INT64, ctypes.c_int,
                                      _PTR, _PTR, ctypes.c_int]
    library.repack_stored.restype = ctypes.c_int
    library.quantize_gguf.argtypes = [_PTR, _INT64, _INT64, ctypes.c_int, _PTR, ctypes.c_int]
    library.quantize_gguf.restype = None
    return library


@cache
def native_bf16() -> ctypes.CDLL | None:
    """The compiled bfloat16 kernel library, or None (the reason logged once) where it cannot run."""
    library = _load_or_log(*LIBRARIES["native_bf16"], "bfloat16 layers use torch's GEMM")
    if library is None:
        return None
    library.bf16_linear.argtypes = [_PTR, _PTR, _PTR, _INT64, _INT64, _INT64, ctypes.c_int]
    library.bf16_linear.restype = ctypes.c_int
    library.bf16_decode_attention.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, *[_INT64] * 6, _PTR, _INT64, _INT64,
                                              ctypes.c_int]
    library.bf16_decode_attention.restype = ctypes.c_int
    return library


class Projections(ctypes.Structure):
    """decode_layers.c's Projections: up to three weights that multiply one input, each int8 / int4 / a k-quant (its
    bits, group size and kind) or bfloat16 (bits 16), and their served LoRA adapters' stacked matrices (NULL where there
    are none)."""

    _fields_ = [("codes", _PTR * 3), ("scales", _PTR * 3), ("dense", _PTR * 3), ("N", _INT64 * 3), ("count", _INT64),
                ("bits", _INT64 * 3), ("group", _INT64 * 3), ("kind", _INT64 * 3), ("lora_a", _PTR * 3),
                ("lora_b", _PTR * 3), ("lora_rank", _INT64)]


class Layer(ctypes.Structure):
    """decode_layers.c's Layer: one decoder layer's weights, and where its cache keeps keys and values."""

    _fields_ = [("qkv", Projections), ("o", Projections), ("gate_up", Projections), ("down", Projections),
                ("input_norm", _PTR), ("post_attention_norm", _PTR), ("k_cache", _PTR), ("v_cache", _PTR)]


class Dims(ctypes.Structure):
    """decode_layers.c's Dims: the model's sizes and the cache's key-value-head stride (in elements)."""

    _fields_ = [("dim", _INT64), ("hidden", _INT64), ("H", _INT64), ("Hkv", _INT64), ("D", _INT64),
                ("kv_stride_h", _INT64), ("eps", ctypes.c_float)]


@cache
def native_decode() -> ctypes.CDLL | None:
    """The compiled fused decode layers (decode_layers.c), or None (the reason logged once) where they cannot run."""
    library = _load_or_log(*LIBRARIES["native_decode"], "decode steps run layer by layer through torch")
    if library is None:
        return None
    library.decode_layers.argtypes = [_PTR, _INT64, ctypes.POINTER(Layer), _INT64, ctypes.POINTER(Dims), _PTR, _PTR,
                                      _PTR, _PTR, _INT64, _PTR, ctypes.c_int]
    library.decode_layers.restype = ctypes.c_int
    library.rms_norm_rows.argtypes = [_PTR, _PTR, _PTR, _INT64, _INT64, ctypes.c_float, ctypes.c_int]
    library.rms_norm_rows.restype = None
    library.swiglu_rows.argtypes = [_PTR, _PTR, _PTR, _INT64, ctypes.c_int]
    library.swiglu_rows.restype = None
    library.lora_rows.argtypes = [_PTR, _PTR, _PTR, *[_INT64] * 4, _PTR, _PTR, _INT64, _PTR, ctypes.c_int]
    library.lora_rows.restype = None
    return library


def mark_constants_for_compile() -> None:
    """Tell torch.compile that whether the kernels loaded is a constant, so it never traces into ctypes. Called where
    compiling starts rather than at import: torch.compiler's marker imports torch._dynamo (1.5 s and ~80 MB)."""
    for check in (available, bf16_available, decode_available):
        torch.compiler.assume_constant_result(check)  # marks the function itself: every caller sees it


def decode_available() -> bool:
    """Whether the fused decode library loaded (a constant to torch.compile)."""
    return native_decode() is not None


def compiled_op(kernel: Callable[..., torch.Tensor], like: int) -> Callable[..., torch.Tensor]:
    """`kernel` as the torch operator `llamaforge::<its name>` (the schema from its annotations), so that a
    torch.compile'd graph calls it as one opaque node; tracing takes its output to be a contiguous tensor shaped like
    its argument number `like`."""
    op = torch.library.custom_op(f"llamaforge::{kernel.__name__}", mutates_args=())(kernel)
    op.register_fake(lambda *args: torch.empty_like(args[like], memory_format=torch.contiguous_format))
    return op


def bf16_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.rms_norm of bfloat16 CPU tensors by decode_layers.c, which the fused decode layers round alike."""
    x = x.contiguous()
    out = torch.empty_like(x)
    native_decode().rms_norm_rows(x.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(),
                                  x.numel() // x.shape[-1], x.shape[-1], eps, torch.get_num_threads())
    return out


bf16_rms_norm_op = compiled_op(bf16_rms_norm, like=0)


def bf16_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """model.swiglu of bfloat16 CPU tensors by decode_layers.c, which the fused decode layers round alike."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    native_decode().swiglu_rows(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
    return out


bf16_swiglu_op = compiled_op(bf16_swiglu, like=0)


def bf16_lora(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """y (B, T, N) plus each sequence's LoRA update of x (B, T, K), bfloat16 CPU tensors, by decode_layers.c, which
    the fused decode layers round alike: a (slots, rank, K) and b (slots, rank, N) float32, slots (B) int64 (0:
    none). A new tensor."""
    x, y, slots = x.contiguous(), y.contiguous(), slots.contiguous()
    out = torch.empty_like(y)
    B, T, K = x.shape
    native_decode().lora_rows(x.data_ptr(), y.data_ptr(), out.data_ptr(), B, T, K, y.shape[-1], a.data_ptr(),
                              b.data_ptr(), a.shape[1], slots.data_ptr(), torch.get_num_threads())
    return out


bf16_lora_op = compiled_op(bf16_lora, like=1)


def bf16_inference(*tensors: torch.Tensor) -> bool:
    """Whether these are bfloat16 CPU tensors outside autograd: what the bfloat16 kernels take."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors) and not torch.is_grad_enabled()


def eager_or_op(kernel: Callable[..., torch.Tensor], op: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """kernel(*args), or inside a torch.compile'd graph its torch operator `op` (dynamo must not trace ctypes)."""
    return (op if torch.compiler.is_compiling() else kernel)(*args)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fallback: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`bf16_rms_norm` where it takes these tensors, else `fallback(x, weight, eps)`."""
    if not (bf16_inference(x, weight) and decode_available()):
        return fallback(x, weight, eps)
    return eager_or_op(bf16_rms_norm, bf16_rms_norm_op, x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, fallback: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`bf16_swiglu` where it takes these tensors, else `fallback(gate, up)`."""
    if not (bf16_inference(gate, up) and decode_available()):
        return fallback(gate, up)
    return eager_or_op(bf16_swiglu, bf16_swiglu_op, gate, up)


def bf16_available() -> bool:
    """Whether the bfloat16 kernel loaded (a constant to torch.compile)."""
    return native_bf16() is not None


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight.T for bfloat16 CPU tensors with the compiled kernel: (M, N) bfloat16."""
    x, weight = x.contiguous(), weight.contiguous()
    M, K = x.shape
    y = torch.empty(M, weight.shape[0], dtype=torch.bfloat16)
    if native_bf16().bf16_linear(x.data_ptr(), weight.data_ptr(), y.data_ptr(), M, weight.shape[0], K,
                                 torch.get_num_threads()) != 0:
        raise MemoryError(f"the bfloat16 kernel could not allocate room for {M} x {K} activations")
    return y


@torch.library.custom_op("llamaforge::bf16_linear", mutates_args=())
def bf16_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`bf16_linear` as a torch operator, for torch.compile'd graphs."""
    return bf16_linear(x, weight)


@bf16_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def bf16_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of queries (B, H, T, D) over cached keys and values (B, Hkv, L, D), bfloat16 CPU tensors, with a
    boolean mask (B, 1, T, L), by the compiled kernel (bf16linear.c): (B, H, T, D) bfloat16. It rounds where
    model.decode_attention's torch ops do, and computes each query alike whatever the other queries. k and v are
    views of one cache layout (same strides, last one 1); the head size is a multiple of 16, at most 256."""
    return bf16_cache_attention(q, k, v, KVCache(k, v).offsets(), mask)


def bf16_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """`bf16_decode_attention` reading row b's position l of k and v at element offsets[b, l] (plus the key-value
    head's stride): a contiguous cache's rows or a paged cache's blocks (model.KVCache.offsets); mask (B, 1, T, L),
    offsets (B, >= L) int64 with unit last stride."""
    B, H, T, D = q.shape
    L = mask.shape[-1]
    q, mask = q.contiguous(), mask.reshape(B, T, L).contiguous()
    out = torch.empty_like(q)
    status = native_bf16().bf16_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(),
                                                 out.data_ptr(), B, H, k.shape[1], T, D, L, offsets.data_ptr(),
                                                 offsets.stride(0), k.stride(1), torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"the attention kernel could not allocate room for {B * H * T} x {L} scores")
    return out


bf16_cache_attention_op = compiled_op(bf16_cache_attention, like=0)


def attend_cache(q: torch.Tensor, cache: KVCache, mask: torch.Tensor, kv_len: int,
                 fallback: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`bf16_cache_attention` over the cache's first kv_len positions where it takes these tensors (bfloat16 on the
    CPU, no autograd, k and v alike in layout, head size a multiple of 16 up to 256), else `fallback(q, cache, mask,
    kv_len)` (model.attend_cache)."""
    k, v = cache.k, cache.v
    if (not bf16_inference(q, k) or k.stride() != v.stride() or k.stride(-1) != 1 or q.shape[-1] > 256
            or q.shape[-1] % 16 or not bf16_available()):
        return fallback(q, cache, mask, kv_len)
    return eager_or_op(bf16_cache_attention, bf16_cache_attention_op, q, k, v, cache.offsets(), mask)


def available() -> bool:
    """Whether the compiled kernel loaded (a constant to torch.compile, which then never traces ctypes)."""
    return native() is not None


def kernel_runs(x: torch.Tensor) -> bool:
    """Whether the compiled kernel takes this activation (on the CPU, float32 or bfloat16)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and available()


MAX_MANY = 8  # weights one qlinear_many call takes
KIND_CODES = {"int": 0, "q4_k": 1, "q6_k": 2, "q5_k": 3}  # QuantizedWeight.kind -> qlinear.c's KIND_INT, KIND_Q4_K ...


def qlinear_many(x: torch.Tensor, weights: Sequence[QuantizedWeight]) -> list[torch.Tensor]:
    """x (M, K) @ W.T for each of `weights` (one bit width and group size), in one kernel call that quantizes x
    once and spreads all their rows over the threads: [(M, N_i)] in x's dtype. Call only where `kernel_runs(x)`."""
    x = x.contiguous()
    M, K = x.shape
    first, count = weights[0], len(weights)
    if count > MAX_MANY or any((q.bits, q.group_size, q.kind, q.in_features) != (first.bits, first.group_size,
                                                                                first.kind, K) for q in weights):
        raise ValueError(f"qlinear_many takes up to {MAX_MANY} weights of one scheme and input width {K}")
    ys = [torch.empty(M, q.out_features, dtype=x.dtype) for q in weights]
    pointers = ctypes.c_void_p * count
    status = native().qlinear_many(
        x.data_ptr(), count, pointers(*(q.codes.data_ptr() for q in weights)),
        pointers(*(q.scales.data_ptr() for q in weights)), pointers(*(y.data_ptr() for y in ys)),
        (ctypes.c_int64 * count)(*(q.out_features for q in weights)), M, K, first.bits, first.group_size,
        KIND_CODES[first.kind], x.dtype == torch.bfloat16, torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"the int{first.bits} kernel could not allocate room for {M} x {K} activations")
    return ys


def qlinear(x: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """x (M, K) @ W.T with the compiled kernel: (M, N) in x's dtype. Call only where `kernel_runs(x)`."""
    return qlinear_many(x, [q])[0]


@torch.library.custom_op("llamaforge::qlinear_many", mutates_args=())
def qlinear_many_op(x: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor], bits: int,
                    group_size: int, kind: str, in_features: int, out_features: list[int]) -> list[torch.Tensor]:
    """`qlinear_many` as a torch operator, so a torch.compile'd graph calls the kernel as one opaque node."""
    return qlinear_many(x, [QuantizedWeight(c, s, bits, group_size, in_features, n, kind)
                            for c, s, n in zip(codes, scales, out_features, strict=True)])


@qlinear_many_op.register_fake
def _(x: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor], bits: int, group_size: int, kind: str,
      in_features: int, out_features: list[int]) -> list[torch.Tensor]:
    return [x.new_empty((x.shape[0], n)) for n in out_features]


def dequantize(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight in `dtype`: the compiled kernel's threaded loop where it runs (float32 / bfloat16 on the CPU;
    the same numbers as formats.dequantize_weight), else torch."""
    library = native()
    if library is None or dtype not in (torch.float32, torch.bfloat16) or q.codes.device.type != "cpu":
        return dequantize_weight(q, dtype)
    out = torch.empty(q.out_features, q.in_features, dtype=dtype)
    library.dequantize(q.codes.data_ptr(), q.scales.data_ptr(), out.data_ptr(), q.out_features, q.in_features,
                       q.bits, q.group_size, KIND_CODES[q.kind], dtype == torch.bfloat16, torch.get_num_threads())
    return out


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """formats.quantize_weight (llama.cpp's Q8_0 / Q4_0 rules): in one threaded compiled pass for a CPU weight where
    the kernels run (the same codes and scales for finite weights; a 7B model's linears in seconds, where torch took
    ~40 s), else in torch."""
    library = native()
    if library is None or weight.device.type != "cpu" or weight.dim() != 2:
        return quantize_weight(weight, bits, group_size)
    check_scheme(bits, group_size)
    N, K = weight.shape
    group = group_width(bits, group_size, K)
    w = weight.detach()
    w = (w if w.dtype in (torch.float32, torch.bfloat16) else w.float()).contiguous()
    codes, scales = _empty_layout(N, K, bits, "int", -(-K // group))
    if library.quantize_rows(w.data_ptr(), w.dtype == torch.bfloat16, N, K, bits, group, codes.data_ptr(),
                             scales.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError(f"no room to quantize a {N} x {K} weight")
    return QuantizedWeight(codes, scales, bits, group, K, N)


def quantize_gguf(weight: np.ndarray, bits: int) -> np.ndarray | None:
    """A float weight (N, K) as GGUF's Q8_0 (bits 8) or Q4_0 (4) blocks, (N, K / 32 * (2 + 4 * bits)) uint8, the bytes
    llama.cpp's quantizer (and gguf-py's) writes, in one threaded compiled pass; None where the kernels do not run."""
    library = native()
    if library is None:
        return None
    w = np.ascontiguousarray(weight, dtype=np.float32)
    N, K = w.shape
    out = np.empty((N, K // BLOCK * (2 + BLOCK * bits // 8)), dtype=np.uint8)
    library.quantize_gguf(w.ctypes.data, N, K, bits, out.ctypes.data, torch.get_num_threads())
    return out


def _empty_layout(N: int, K: int, bits: int, kind: str, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Room for an N x K weight's codes and scales in the kernel's layout (formats.QuantizedWeight): kind "int"
    with `n_groups` float16 scales a row, or a k-quant's scale bytes for each 256 weights."""
    tiles = -(-N // TILE)
    codes = torch.empty(tiles, -(-K // BLOCK), TILE * BLOCK * bits // 8, dtype=torch.uint8)
    if kind == "int":
        return codes, torch.empty(tiles, n_groups, TILE, dtype=torch.float16)
    return codes, torch.empty(tiles, K // SUPER_BLOCK, Q6_K_SUPER_BYTES if kind == "q6_k" else SUPER_BYTES,
                              dtype=torch.uint8)


def repack_stored(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int,
                  kind: str = "int") -> QuantizedWeight:
    """formats.from_stored (a quantized checkpoint's row-major codes and scales into the kernel's layout): one
    threaded compiled pass where the kernels run and the tensors have the stored layout's shapes, else torch."""
    library = native()
    N, K = codes.shape[0], in_features
    width = stored_width(K) * bits // 8
    scale_shape = ((N, -(-K // group_size)) if kind == "int" else
                   (N, K // SUPER_BLOCK * (STORED_Q6_K_BYTES if kind == "q6_k" else STORED_Q4_K_BYTES)))
    expected = torch.float16 if kind == "int" else torch.uint8
    if (library is None or codes.device.type != "cpu" or codes.dtype != torch.uint8 or tuple(codes.shape) != (N, width)
            or tuple(scales.shape) != scale_shape or scales.dtype != expected
            or (kind != "int" and K % SUPER_BLOCK)):
        return from_stored(codes, scales, bits, group_size, in_features, kind)
    codes, scales = codes.contiguous(), scales.contiguous()
    out_codes, out_scales = _empty_layout(N, K, bits, kind, scale_shape[1])
    if library.repack_stored(codes.data_ptr(), width, scales.data_ptr(), scales[0].nbytes if N else 0, N, K, bits,
                             group_size, KIND_CODES[kind], out_codes.data_ptr(), out_scales.data_ptr(),
                             torch.get_num_threads()) != 0:
        raise MemoryError(f"no room to repack a {N} x {K} weight")
    return QuantizedWeight(out_codes, out_scales, bits, group_size, K, N, kind=kind)


def repack_gguf(blocks: np.ndarray, type_name: str, shape: tuple[int, int],
                row_order: torch.Tensor | None = None) -> QuantizedWeight:
    """A GGUF tensor's raw bytes (blocks: uint8, e.g. the mapped file's) of one of formats.GGUF_SCHEMES' types as a
    QuantizedWeight, its rows in `row_order` ((N,) file rows) or the file's: one threaded pass of the compiled
    library where it runs (a 7B Q4_K_M file's weights in seconds), else formats.from_gguf in torch (the same bytes).
    """
    bits, kind = GGUF_SCHEMES[type_name]
    N, K = shape
    per_block = {"int": (BLOCK, 2 + BLOCK * bits // 8), "q4_k": (SUPER_BLOCK, Q4_K_BYTES),
                 "q5_k": (SUPER_BLOCK, Q5_K_BYTES), "q6_k": (SUPER_BLOCK, Q6_K_BYTES)}[kind]
    if K % per_block[0] or blocks.size != N * K // per_block[0] * per_block[1]:
        raise ValueError(f"a {type_name} tensor of shape {N} x {K} needs rows of whole {per_block[0]}-weight blocks "
                         f"and {N * K // per_block[0] * per_block[1]} bytes; got {blocks.size}")
    library = native()
    if library is None:
        return from_gguf(torch.from_numpy(np.array(blocks)), type_name, shape, row_order)  # a writable copy
    blocks = np.ascontiguousarray(blocks)
    codes, scales = _empty_layout(N, K, bits, kind, K // BLOCK)
    order = None if row_order is None else row_order.to(torch.int64).contiguous()
    if library.repack_gguf(blocks.ctypes.data, N, K, None if order is None else order.data_ptr(), bits,
                           KIND_CODES[kind], codes.data_ptr(), scales.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError(f"no room to repack a {N} x {K} {type_name} tensor")
    group = BLOCK if kind == "int" else K_QUANT_SCHEMES[kind][1]
    return QuantizedWeight(codes, scales, bits, group, K, N, kind=kind)


def fallback_linear(x: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """x @ W.T with W dequantized to x's dtype: any device, any row count."""
    return F.linear(x, dequantize(q, x.dtype).to(x.device))


def quantize_activations_reference(x: torch.Tensor, kind: str = "int") -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) as the kernel quantizes it for weights of `kind`: int8 values (M, blocks * 32) and float32 scales, one
    for each 32 values (M, blocks), or for a k-quant one for each 256 (M, K / 256), as llama.cpp's Q8_K: the value of
    largest magnitude (the first of equals) max, iscale = -127 / max, values round(iscale * x), scale 1 / iscale."""
    M, K = x.shape
    width = BLOCK if kind == "int" else SUPER_BLOCK
    blocks = F.pad(x.float(), (0, -K % width)).view(M, -1, width)
    if kind == "int":
        scales = blocks.abs().amax(dim=-1) / 127
        inverse = torch.where(scales != 0, 1 / scales, torch.zeros_like(scales))
    else:
        largest = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))[..., 0]  # argmax: the first of equals
        # A division, as the C's (`-127 / tensor` would multiply by the reciprocal, rounding twice).
        inverse = torch.where(largest != 0, torch.full_like(largest, -127.0) / largest, torch.zeros_like(largest))
        scales = torch.where(largest != 0, 1 / inverse, torch.zeros_like(largest))
    values = (blocks * inverse[..., None]).round()  # round half to even, as the kernel's conversion does
    return values.view(M, -1), scales


def qlinear_reference(x: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """The kernel's result computed in torch, in float64 (the kernel sums in float32): (M, N) float32. Each
    32-weight block's sum is x_scale * (w_scale * integer dot product - w_min * sum of x's codes), w_min being
    zero but for Q4_K / Q5_K, whose codes are taken without their offset; Q6_K's half blocks each have their scale;
    x_scale is the activations' scale of the block (of its 256 for a k-quant)."""
    values, x_scales = quantize_activations_reference(x, q.kind)  # (M, blocks * 32), (M, blocks or K / 256)
    sub = q.sub_block  # weights of a row under one scale (and min)
    subs = values.shape[1] // sub
    codes = unpack_codes(q).double() + (BIAS[q.bits] if q.kind in WITH_MINS else 0)
    w_subs = F.pad(codes, (0, -q.in_features % BLOCK)).view(q.out_features, subs, sub)
    x_subs = values.double().view(x.shape[0], subs, sub)
    dots = torch.einsum("msk,nsk->mns", x_subs, w_subs)  # (M, N, subs): exact integers
    w_scales, w_mins = (t.double() for t in q.block_scales())  # (N, subs) each
    sums = x_subs.sum(-1)[:, None, :]  # (M, 1, subs)
    x_scales = x_scales.double().repeat_interleave(subs // x_scales.shape[1], dim=1)[:, None, :]
    return (x_scales * (dots * w_scales[None] - sums * w_mins[None])).sum(-1).float()
