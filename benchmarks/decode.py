"""Batch-1 greedy prefill and decode throughput: llamaforge against llama.cpp and HF transformers, same weights.

One random-weight model (TinyLlama-1.1B's shape by default) runs in each mode side by side with what a user
would run instead:

| mode | llamaforge | llama.cpp (llama-cpp-python) | HF transformers |
| --- | --- | --- | --- |
| fp32 | float32 | F32 GGUF | float32 |
| bf16 | bfloat16 | F16 GGUF | bfloat16 |
| int8 | `load(quantize="int8")` | Q8_0 GGUF | - |
| int4 | `load(quantize="int4")` | Q4_0 GGUF | - |
| q4_0 | `load()` of the Q4_0 GGUF | the same file | - |
| q8_0 | `load()` of the Q8_0 GGUF | the same file | - |
| q4_k_m | `load()` of the Q4_K_M GGUF | the same file | - |
| q5_k_m | `load()` of the Q5_K_M GGUF | the same file | - |

The GGUF files are written by llamaforge's exporter (F32, F16) and quantized from the F16 file by llama.cpp's
own quantizer (`llama_model_quantize`, what `llama-quantize` runs: Q4_0 keeps output.weight at Q6_K). The file
modes q4_0, q8_0, q4_k_m and q5_k_m (not in the default modes; they need llama.cpp) are what a user of a downloaded
GGUF gets: llamaforge loads llama.cpp's own file as it loads any GGUF (its weights as stored), so both sides read the
same bytes. The random weights are made in bfloat16 (in float32 only with fp32 among the modes), one tensor at a
time, and dropped once only file modes are left: `--preset 7B --modes q4_0,q4_k_m,q8_0 --no-hf` fits in 24 GB.
llama-cpp-python lives in its own venv (`../shared/tools/llamacpp-venv.sh DIR` builds one); pass its Python with
`--llamacpp-python`, or it is looked for in $LLAMACPP_PYTHON and .venv-llamacpp/. Without it, the llama.cpp
column is skipped and says so. HF runs in this process on llamaforge's own tensors (assigned, not copied).

- prefill tok/s: prompt tokens / time to the first new token.
- decode tok/s: 1 / seconds per later token, from the first new token to the last.
- decode GB/s: bytes of the linear layers' weights x decode tok/s, the weight bandwidth decoding implies (for
  llama.cpp, the bytes of its GGUF's tensors but the token embeddings, which a step reads one row of).
- the machine's ceilings (benchmarks/ceilings.py), measured after every round: memory read GB/s and the mode's
  dot-product GMAC/s (int8 for int8 / int4, bfloat16 for bf16). Decoding cannot beat the read bandwidth and prefill
  not the dot products, so "% of ceiling" says how much either side leaves on the table, and which ratio is still
  possible. Other load only ever lowers a measured ceiling (on a shared machine, by half at times), so the highest
  of the rounds is the ceiling; each side's median is set against it.
  Prefill GMAC/s counts the linear layers' multiply-adds of every prompt token (the output layer's of the last one;
  attention adds under 1% at 128 tokens and is not counted); the peak is int8's for int8 / int4, bfloat16's else.
- tokens agree: how many leading greedy tokens equal llamaforge's (random weights have near-ties, so lower-bit
  modes drift apart sooner; fp32 against HF must agree throughout).

Each case gets a warm-up run per implementation, then `--repeats` rounds that alternate the implementations so
drift on the machine hits all alike; medians are reported with every run in the JSON.

    python benchmarks/decode.py --llamacpp-python .venv-llamacpp/bin/python         # all four modes
    python benchmarks/decode.py --preset tiny --repeats 1 --modes fp32,int4 --json  # smoke test, seconds
"""

from __future__ import annotations  # noqa: I001 (llamaforge before torch, below)

# Before torch: llamaforge asks it for huge pages, as every llamaforge command has them (llamaforge/hugepages.py).
import llamaforge

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import torch
import transformers
from ceilings import Ceilings
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from llamaforge.checkpoint import build_model
from llamaforge.checkpoint.gguf import write_gguf
from llamaforge.config import PRESETS, ModelArgs
from llamaforge.generate import generate_events
from llamaforge.model import Llama, random_weights
from llamaforge.quantize import Bf16Linear, linear_bytes, quantize_model, use_bf16_kernel, use_fused_decode
from llamaforge.sampling import SamplingParams
from llamaforge.tokenizer import Tokenizer, sentencepiece_proto

Run = Callable[[], tuple[float, float, list[int]]]  # () -> (prefill s, decode s per token, generated ids)
MODES = {"fp32": (torch.float32, None, "f32"), "bf16": (torch.bfloat16, None, "f16"),
         "int8": (torch.bfloat16, "int8", "q8_0"), "int4": (torch.bfloat16, "int4", "q4_0"),
         "q4_0": (torch.bfloat16, "gguf", "q4_0"), "q8_0": (torch.bfloat16, "gguf", "q8_0"),
         "q4_k_m": (torch.bfloat16, "gguf", "q4_k_m"), "q5_k_m": (torch.bfloat16, "gguf", "q5_k_m")}
# ("gguf": llamaforge loads llama.cpp's file.) What bounds each mode's prefill:
DOT_CEILINGS = {"bf16": "bf16", "int8": "int8", "int4": "int8", "q4_0": "int8", "q8_0": "int8", "q4_k_m": "int8",
                "q5_k_m": "int8"}
WORKER = Path(__file__).with_name("llamacpp_worker.py")
REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass
class Measurement:
    """Medians over the repeats for one implementation in one mode."""

    prefill_s: float
    decode_s_per_token: float
    tokens: list[int]
    runs: list[tuple[float, float]]  # (prefill s, decode s per token) of every measured run

    def row(self, prompt_len: int, weight_bytes: int) -> dict:
        tok_s = 1.0 / self.decode_s_per_token
        return {"prefill_s": self.prefill_s, "prefill_tok_s": prompt_len / self.prefill_s,
                "decode_ms_per_token": self.decode_s_per_token * 1e3, "decode_tok_s": tok_s,
                "decode_gb_s": weight_bytes * tok_s / 1e9, "tokens": self.tokens,
                "runs": [{"prefill_s": p, "decode_s_per_token": d} for p, d in self.runs]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--modes", default="fp32,bf16,int8,int4", help="comma-separated, from " + ", ".join(MODES))
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per case; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="threads for every implementation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    parser.add_argument("--llamacpp-python", help="Python of a venv with llama-cpp-python (default: "
                        "$LLAMACPP_PYTHON, else .venv-llamacpp/bin/python if it exists)")
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers (fp32 and bf16 only anyway)")
    parser.add_argument("--compile", action="store_true", help="also measure llamaforge with compiled decode steps "
                        "(its compile happens in the warm-up run)")
    parser.add_argument("--layered", action="store_true", help="also measure int8 / int4 llamaforge with the fused "
                        "decode layers off (each step layer by layer through torch, as without the C kernels)")
    parser.add_argument("--batch-invariant", action="store_true", help="also measure bf16 llamaforge loaded "
                        "batch-invariant (its linears on the kernel for prompts too; JSON only)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes takes names from {', '.join(MODES)}, got {unknown or 'none'}")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2, --prompt-len and --repeats >= 1")
    if args.prompt_len + args.new_tokens > PRESETS[args.preset].max_seq_len:
        parser.error(f"--prompt-len + --new-tokens exceeds {args.preset}'s {PRESETS[args.preset].max_seq_len} tokens")
    if args.llamacpp_python is None:
        default = os.environ.get("LLAMACPP_PYTHON") or REPOSITORY / ".venv-llamacpp" / "bin" / "python"
        args.llamacpp_python = str(default) if Path(default).exists() else None
    from_gguf = [m for m in args.modes if MODES[m][1] == "gguf"]
    if from_gguf and args.llamacpp_python is None:
        parser.error(f"--modes {','.join(from_gguf)} runs llama.cpp's own file, which its quantizer makes: pass "
                     "--llamacpp-python (../shared/tools/llamacpp-venv.sh DIR builds a venv)")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def hf_twin(model: Llama) -> LlamaForCausalLM:
    """An HF `LlamaForCausalLM` whose parameters are `model`'s tensors (shared, not copied)."""
    hf_config = LlamaConfig(**model.config.to_hf_config())
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(hf_config)
    hf_model.load_state_dict(model.state_dict(), assign=True, strict=True)
    # inv_freq is a non-persistent buffer, so the state dict left it on the meta device.
    hf_model.model.rotary_emb = LlamaRotaryEmbedding(hf_config)
    return hf_model.eval()


def run_ours(model: Llama, prompt: list[int], new_tokens: int,
             compile: bool = False) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds per token, generated ids) of one greedy llamaforge run (steps that
    compiled a graph, in the warm-up, are not counted as decoding)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    timings: dict[str, float] = {}
    tokens = [event.token_id for event in generate_events(model, None, [prompt], [params], timings=timings,
                                                          compile=compile)]
    return timings["prefill_s"], timings["decode_s"] / timings["decode_steps"], tokens


class TokenClock(BaseStreamer):
    """A streamer that only notes when `generate` hands it tokens: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model: LlamaForCausalLM, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds per token, generated ids) of one greedy HF `generate`.

    The prefill ends when the first new token reaches the streamer; decoding is the time from there to
    the last token, per token after the first (as llamaforge's timings count it).
    """
    clock = TokenClock()
    started = time.perf_counter()
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=model.config.eos_token_id, streamer=clock)
    first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt, before any forward pass
    return first - started, (last - first) / (new_tokens - 1), output[0, input_ids.shape[1]:].tolist()


def measure(runs: dict[str, Run], repeats: int,
            between: Callable[[], dict] | None = None) -> tuple[dict[str, Measurement], list[dict]]:
    """Warm every implementation up, then alternate them `repeats` times, calling `between` after each round;
    medians per implementation, and what `between` returned."""
    for run in runs.values():
        run()
    results: dict[str, list] = {name: [] for name in runs}
    probes = []
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
        if between is not None:
            probes.append(between())
    return {name: median(r) for name, r in results.items()}, probes


def median(results: list[tuple[float, float, list[int]]]) -> Measurement:
    """Median prefill and decode times of several runs; tokens from the first."""
    return Measurement(statistics.median(r[0] for r in results), statistics.median(r[1] for r in results),
                       results[0][2], [(r[0], r[1]) for r in results])


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many tokens the two greedy sequences share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class LlamaCpp:
    """llama.cpp in a worker process of the llama-cpp-python venv (benchmarks/llamacpp_worker.py)."""

    def __init__(self, python: str) -> None:
        # llama.cpp logs every tensor it quantizes to stderr; errors come back in the answers instead.
        self.process = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        self.version = None

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp worker exited; run it by hand to see why: "
                               f"{self.process.args[0]} {WORKER}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"llama.cpp: {answer['error']}")
        return answer

    def load(self, path: Path, threads: int, context: int, logits_all: bool = False) -> None:
        self.version = self.ask(op="load", path=str(path), threads=threads, context=context,
                                logits_all=logits_all)["version"]

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        answer = self.ask(op="run", prompt=prompt, new_tokens=new_tokens)
        return answer["prefill_s"], answer["decode_s_per_token"], answer["tokens"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def synthetic_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    """A SentencePiece vocabulary of `vocab_size` pieces (the prompts are ids, so any vocabulary of the model's
    size will do for the GGUF files): control pieces, the 256 byte pieces, then made-up words."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{byte:02X}>", 0.0, 6) for byte in range(256)]
    pieces += [(f"\u2581w{i}", -float(i), 1) for i in range(vocab_size - len(pieces))]
    path.write_bytes(sentencepiece_proto(pieces))
    return Tokenizer(path)


def gguf_files(model: Llama, modes: list[str], workdir: Path, llamacpp: LlamaCpp) -> dict[str, Path]:
    """The model as a GGUF per mode: F32 / F16 from llamaforge's exporter, Q8_0 / Q4_0 from llama.cpp's quantizer."""
    tokenizer = synthetic_tokenizer(workdir / "tokenizer.model", model.config.vocab_size)
    state = model.state_dict()
    files = {}
    f16 = None
    for mode in modes:
        kind = MODES[mode][2]
        if kind in ("f32", "f16"):
            files[mode] = write_gguf(state, model.config, tokenizer, workdir / f"model-{kind}.gguf", kind)
    if any(MODES[m][2].startswith("q") for m in modes):
        f16 = files.get("bf16") or write_gguf(state, model.config, tokenizer, workdir / "model-f16.gguf", "f16")
    quantized: dict[str, Path] = {}  # int4 and q4_0 run the same file, made once
    for mode in modes:
        kind = MODES[mode][2]
        if kind.startswith("q") and kind not in quantized:
            log(f"llama.cpp quantizes the F16 file to {kind.upper()}")
            quantized[kind] = Path(llamacpp.ask(op="quantize", source=str(f16),
                                                out=str(workdir / f"model-{kind}.gguf"), kind=kind)["path"])
        if kind.startswith("q"):
            files[mode] = quantized[kind]
    return files


def model_in_mode(base: Llama | None, mode: str, gguf_path: Path | None = None) -> Llama:
    """The benchmark model in `mode` as `llamaforge.load` makes it: cast, or a quantized twin of the bfloat16 weights;
    in bfloat16, linears and attention over the cache go through the AVX-512 BF16 kernels where the CPU has them,
    and int8 / int4 decode steps through the fused decode layers. A "gguf" mode is `llamaforge.load(gguf_path)`."""
    dtype, quantize, _ = MODES[mode]
    if quantize == "gguf":
        return llamaforge.load(gguf_path).model
    base.to(dtype)  # in place: float32 runs first, then the other modes cast the same weights down
    # The twin shares base's tensors until quantize_model replaces its layers one by one (no copy of the model).
    model = base if quantize is None else quantize_model(
        build_model(base.config, base.state_dict().items(), dtype, torch.device("cpu")), quantize)
    use_bf16_kernel(model)  # as load() does: bfloat16 linears and attention through the kernels (none in float32)
    use_fused_decode(model)
    return model


def run_layered(model: Llama, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """`run_ours` with the fused decode layers off: every step layer by layer through torch."""
    fused, model.fused_decode = getattr(model, "fused_decode", None), None
    try:
        return run_ours(model, prompt, new_tokens)
    finally:
        model.fused_decode = fused


def run_batch_invariant(model: Llama, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """`run_ours` with the bfloat16 linears batch-invariant (as `load(..., batch_invariant=True)` makes them)."""
    use_bf16_kernel(model, batch_invariant=True)
    try:
        return run_ours(model, prompt, new_tokens)
    finally:
        for layer in model.modules():
            if isinstance(layer, Bf16Linear):
                del layer.kernel_max_tokens  # back to the class's default


def gguf_step_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors that a decode step reads: all but the token embeddings."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")


def prefill_macs(config: ModelArgs, prompt_len: int) -> int:
    """Multiply-adds of the linear layers in a prefill: every layer for every token, the output layer for the last."""
    kv_dim = config.n_kv_heads * config.head_dim
    layer = 2 * config.dim * config.dim + 2 * config.dim * kv_dim + 3 * config.dim * config.hidden_dim
    return prompt_len * config.n_layers * layer + config.vocab_size * config.dim


def compare(base: Llama | None, config: ModelArgs, mode: str, prompt: list[int], args: argparse.Namespace,
            llamacpp: LlamaCpp | None, gguf_paths: dict[str, Path], ceilings: Ceilings | None) -> dict:
    """Measure llamaforge, llama.cpp and (float modes) HF in one mode, and the machine's ceilings in the same rounds;
    a JSON-ready row."""
    ours = model_in_mode(base, mode, gguf_paths.get(mode))
    runs: dict[str, Run] = {"llamaforge": lambda: run_ours(ours, prompt, args.new_tokens)}
    if args.compile:
        runs["llamaforge --compile"] = lambda: run_ours(ours, prompt, args.new_tokens, compile=True)
    if args.layered and getattr(ours, "fused_decode", None) is not None:
        runs["llamaforge layered"] = lambda: run_layered(ours, prompt, args.new_tokens)
    if args.batch_invariant and mode == "bf16":
        runs["llamaforge batch-invariant"] = lambda: run_batch_invariant(ours, prompt, args.new_tokens)
    if llamacpp is not None:
        llamacpp.load(gguf_paths[mode], args.threads, args.prompt_len + args.new_tokens + 8)
        runs["llama.cpp"] = lambda: llamacpp.run(prompt, args.new_tokens)
    if MODES[mode][1] is None and not args.no_hf:
        hf_model = hf_twin(ours)
        prompt_ids = torch.tensor([prompt])
        runs["hf"] = lambda: run_hf(hf_model, prompt_ids, args.new_tokens)
    log(f"{mode}: {', '.join(runs)}: a warm-up and {args.repeats} alternating runs each")
    dot = DOT_CEILINGS.get(mode)  # float32 GEMMs run FMAs, whose peak this does not measure

    def machine() -> dict:
        return {"read_gb_s": ceilings.read_gb_s(), "dot_gmac_s": getattr(ceilings, f"{dot}_gmac_s")() if dot else None}

    measured, rounds = measure(runs, args.repeats, machine if ceilings else None)
    weight_bytes = linear_bytes(ours)
    row = {"mode": mode, "weight_bytes": weight_bytes,
           "gguf_bytes": gguf_paths[mode].stat().st_size if mode in gguf_paths else None}
    macs = prefill_macs(config, args.prompt_len)
    for name, m in measured.items():
        step_bytes = gguf_step_bytes(gguf_paths[mode]) if name == "llama.cpp" else weight_bytes
        row[name] = m.row(args.prompt_len, step_bytes)
        row[name]["prefill_gmac_s"] = macs / m.prefill_s / 1e9
        row[name]["tokens_agree"] = leading_agreement(m.tokens, measured["llamaforge"].tokens)
    row["ratio"] = {other: {key: row["llamaforge"][key] / row[other][key] for key in ("prefill_tok_s", "decode_tok_s")}
                    for other in measured if other != "llamaforge"}
    if ceilings is not None:
        peak = max(r["dot_gmac_s"] for r in rounds) if dot else None
        row["ceiling"] = {"read_gb_s": max(r["read_gb_s"] for r in rounds), "dot": dot, "dot_gmac_s": peak,
                          "rounds": rounds}
        for name in measured:
            row[name]["decode_of_ceiling"] = row[name]["decode_gb_s"] / row["ceiling"]["read_gb_s"]
            if peak:
                row[name]["prefill_of_ceiling"] = row[name]["prefill_gmac_s"] / peak
    return row


def benchmark(args: argparse.Namespace) -> dict:
    """Measure every mode; return a JSON-ready dict of the setup and the per-mode results."""
    torch.set_num_threads(args.threads)
    config: ModelArgs = PRESETS[args.preset]
    log(f"building {args.preset} with random weights ({config.num_parameters() / 1e6:.1f}M parameters)")
    dtype = torch.float32 if "fp32" in args.modes else torch.bfloat16
    base = build_model(config, random_weights(config, seed=args.seed), dtype, torch.device("cpu"))
    prompt = torch.randint(3, config.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    llamacpp = LlamaCpp(args.llamacpp_python) if args.llamacpp_python else None
    if llamacpp is None:
        log("llama.cpp: skipped (no llama-cpp-python venv; ../shared/tools/llamacpp-venv.sh DIR makes one, then "
            "pass --llamacpp-python DIR/bin/python)")
    results = []
    with tempfile.TemporaryDirectory(prefix="llamaforge-decode-") as workdir:
        gguf_paths = gguf_files(base, args.modes, Path(workdir), llamacpp) if llamacpp is not None else {}
        ceilings = Ceilings.load(args.threads)
        if ceilings is None:
            log("the machine's ceilings: skipped (ceilings.c needs AVX-512 (VNNI, BF16) or AVX2 and a C compiler)")
        # float32 first: the other modes cast the same weights down; the file modes last, without them.
        modes = sorted(args.modes, key=lambda m: (m != "fp32", MODES[m][1] == "gguf"))
        for mode in modes:
            if MODES[mode][1] == "gguf":
                base = None  # only llama.cpp's files are left to load
            results.append(compare(base, config, mode, prompt, args, llamacpp, gguf_paths, ceilings))
            gc.collect()  # the mode's model and HF twin go before the next mode is built
        if llamacpp is not None:
            llamacpp.close()
    return {
        "setup": {
            "preset": args.preset, "config": {k: v for k, v in asdict(config).items() if k != "extra"},
            "parameters": config.num_parameters(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp_python": llamacpp.version if llamacpp else None,
            "date": time.strftime("%Y-%m-%d"),
        },
        "results": results,
    }


def format_table(report: dict) -> str:
    """The results as a Markdown table: the implementations side by side, and llamaforge's ratio to each."""
    setup = report["setup"]
    lines = [
        f"preset {setup['preset']} ({setup['parameters'] / 1e6:.1f}M parameters), batch 1, prompt "
        f"{setup['prompt_len']} tokens, {setup['new_tokens']} new tokens, greedy, {setup['threads']} threads, "
        f"median of {setup['repeats']}; torch {setup['torch']}, llama-cpp-python {setup['llama_cpp_python']}, "
        f"transformers {setup['transformers']}",
        "",
        "| mode | weights MB | metric | llamaforge | llamaforge --compile | llama.cpp | HF | ours / llama.cpp | "
        "compiled / llama.cpp | ours / HF |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row: dict, name: str, key: str, digits: int) -> str:
        return f"{row[name][key]:.{digits}f}" if name in row else "-"

    def ratio(row: dict, name: str, key: str, baseline: str) -> str:
        if name not in row or baseline not in row:
            return "-"
        return f"{row[name][key] / row[baseline][key]:.2f}"

    compiled = "llamaforge --compile"
    for row in report["results"]:
        head = f"| {row['mode']} | {row['weight_bytes'] / 1e6:.0f} |"
        for key, label, digits in (("prefill_tok_s", "prefill tok/s", 1), ("decode_tok_s", "decode tok/s", 2)):
            values = " | ".join(cell(row, name, key, digits) for name in ("llamaforge", compiled, "llama.cpp", "hf"))
            ratios = " | ".join(ratio(row, name, key, baseline) for name, baseline in (
                ("llamaforge", "llama.cpp"), (compiled, "llama.cpp"), ("llamaforge", "hf")))
            lines.append(f"{head} {label} | {values} | {ratios} |")
        gb_s = " | ".join(cell(row, name, "decode_gb_s", 1) for name in ("llamaforge", compiled, "llama.cpp"))
        lines.append(f"{head} decode GB/s | {gb_s} | | | | |")
        if "ceiling" in row:
            ceiling = row["ceiling"]
            shown = [("decode_of_ceiling", f"decode, of {ceiling['read_gb_s']:.1f} GB/s read")]
            if ceiling["dot"]:
                shown.append(("prefill_of_ceiling",
                              f"prefill, of {ceiling['dot_gmac_s']:.0f} GMAC/s {ceiling['dot']} dot"))
            for key, label in shown:
                shares = " | ".join(f"{row[name][key]:.0%}" if name in row else "-"
                                    for name in ("llamaforge", compiled, "llama.cpp", "hf"))
                lines.append(f"{head} {label} | {shares} | | | |")
        agree = " / ".join(f"{name} {row[name]['tokens_agree']}" for name in (compiled, "llama.cpp", "hf")
                           if name in row)
        lines.append(f"{head} tokens agree (of {setup['new_tokens']}) | | {agree} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = benchmark(args)
    print(json.dumps(report, indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
