"""Peak resident memory while loading an HF checkpoint: `llamaforge.load` against HF `from_pretrained`.

The script writes a random-weight float32 HF directory (config.json + model.safetensors, about 620 MB by
default), then loads it once per case, each in a fresh interpreter, and reports the peak RSS the load adds
to that interpreter against the size of the loaded model in its target dtype:

    ratio = (ru_maxrss after load - ru_maxrss before load) / model bytes in the target dtype

"Before load" is after `import torch` and the loader's own imports (llamaforge, or transformers'
LlamaForCausalLM), so the delta is the load itself. The goal for llamaforge is a ratio under about 1.3.
Both loaders can leave float32 weights memory-mapped from the file, resident only once read, so each case
then reads every weight once and reports the peak again ("after reading"): that is the model's real cost.

Linux carries a parent's peak RSS into a child's ru_maxrss across fork/exec, so the parent here stays a
small stdlib-only process: writing the checkpoint and every measurement run in subprocesses that import
torch themselves. Each child also reports VmHWM (the peak of its own address space, which exec resets) as
a cross-check.

    python benchmarks/load_memory.py                        # temp dir, removed afterwards
    python benchmarks/load_memory.py --dir /tmp/lm --json   # keep the checkpoint, print JSON
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("llamaforge-fp32", "llamaforge-bf16", "hf-fp32", "hf-bf16")
DIM, HEADS, HIDDEN, VOCAB = 1024, 16, 2816, 32000  # with 7 layers: 155.5M parameters, 622 MB in float32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="checkpoint directory to write and keep (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=7, help="decoder layers; each adds 51 MB in float32")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from " + ", ".join(CASES))
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # child: write the checkpoint here
    parser.add_argument("--measure", choices=CASES, help=argparse.SUPPRESS)  # child: load --dir once, print JSON
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        parser.error(f"--cases takes names from {', '.join(CASES)}, got {unknown or 'none'}")
    return args


def memory_now() -> dict[str, int]:
    """This process's ru_maxrss and /proc/self/status memory lines, all in bytes."""
    stats = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            stats[key] = int(value.split()[0]) * 1024
    return stats


def write_checkpoint(directory: Path, layers: int) -> None:
    """Child: a random-weight float32 HF directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    from llamaforge.config import ModelArgs
    from llamaforge.model import Llama, init_weights

    config = ModelArgs(dim=DIM, n_layers=layers, n_heads=HEADS, hidden_dim=HIDDEN, vocab_size=VOCAB,
                       max_seq_len=2048)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**config.to_hf_config(), "dtype": "float32"}, indent=2))
    model = init_weights(Llama(config))
    save_file(model.state_dict(), str(directory / "model.safetensors"), metadata={"format": "pt"})


def measure_load(case: str, directory: Path) -> dict:
    """Child: load the checkpoint once as `case` says; memory before, after, and after reading every weight."""
    import torch

    library, dtype_name = case.split("-")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if library == "llamaforge":
        import llamaforge

        def load() -> torch.nn.Module:
            return llamaforge.load(directory, dtype=dtype, device="cpu").model
    else:
        from transformers import LlamaForCausalLM

        def load() -> torch.nn.Module:
            return LlamaForCausalLM.from_pretrained(directory, dtype=dtype)

    before = memory_now()
    started = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - started
    after = memory_now()
    with torch.no_grad():  # weights left memory-mapped become resident only when first read
        for param in model.parameters():
            param.sum()
    used = memory_now()
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"case": case, "model_bytes": model_bytes, "param_dtypes": dtypes, "load_s": seconds,
            "before": before, "after": after, "used": used}


def run_child(args: list[str]) -> str:
    """Run this script in a fresh interpreter; its stdout."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def summarise(result: dict) -> dict:
    """Add peak RSS deltas and their ratios to the model's size (from ru_maxrss, and VmHWM as a cross-check)."""
    before, after, used = result["before"], result["after"], result["used"]
    result["peak_delta"] = after["ru_maxrss"] - before["ru_maxrss"]
    result["ratio"] = result["peak_delta"] / result["model_bytes"]
    result["vmhwm_ratio"] = (after["VmHWM"] - before["VmHWM"]) / result["model_bytes"]
    result["used_peak_delta"] = used["ru_maxrss"] - before["ru_maxrss"]
    result["used_ratio"] = result["used_peak_delta"] / result["model_bytes"]
    return result


def format_table(report: dict) -> str:
    """The results as a Markdown table (MB = 10^6 bytes)."""
    mb = 1e6
    lines = [
        f"checkpoint: {report['checkpoint_bytes'] / mb:.0f} MB float32 safetensors ({report['layers']} layers, "
        f"dim {DIM}, vocab {VOCAB}); RSS before load includes torch and the loader's imports",
        "",
        "| case | model MB (target dtype) | RSS before MB | peak RSS MB | peak delta MB | ratio | RSS after MB "
        "| load s | peak delta after reading all weights MB | ratio after reading |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['case']} | {r['model_bytes'] / mb:.0f} | {r['before']['ru_maxrss'] / mb:.0f} "
            f"| {r['after']['ru_maxrss'] / mb:.0f} | {r['peak_delta'] / mb:.0f} | {r['ratio']:.2f} "
            f"| {r['after']['VmRSS'] / mb:.0f} | {r['load_s']:.2f} | {r['used_peak_delta'] / mb:.0f} "
            f"| {r['used_ratio']:.2f} |"
        )
    return "\n".join(lines)


def benchmark(args: argparse.Namespace, directory: Path) -> dict:
    """Write the checkpoint, then measure each case in its own interpreter."""
    print(f"writing the checkpoint to {directory}", file=sys.stderr, flush=True)
    run_child(["--write", str(directory), "--layers", str(args.layers)])
    results = []
    for case in args.cases:
        print(f"loading: {case}", file=sys.stderr, flush=True)
        results.append(summarise(json.loads(run_child(["--measure", case, "--dir", str(directory)]))))
    return {"layers": args.layers, "checkpoint_bytes": (directory / "model.safetensors").stat().st_size,
            "results": results}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.write:
        write_checkpoint(args.write, args.layers)
        return
    if args.measure:
        print(json.dumps(measure_load(args.measure, args.dir)))
        return
    if args.dir:
        report = benchmark(args, args.dir)
    else:
        with tempfile.TemporaryDirectory(prefix="load_memory-") as tmp:
            report = benchmark(args, Path(tmp))
    print(json.dumps(report, indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
