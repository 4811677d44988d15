"""Load time, side by side: `llamaforge.load` of a model against llama.cpp's load of the same GGUF file (through
llama-cpp-python), and against other llamaforge checkouts, each load in a fresh process, the sides alternating.

Each side imports its library before the clock starts (torch for llamaforge, llama_cpp for llama.cpp), then times
the load alone. Memory: peak RSS, and the peak of the anonymous part (RssAnon, sampled every 20 ms): RSS also counts
the mapped file's pages (GGUF, safetensors), which the kernel can drop, so the anonymous peak is what decides whether
a model fits.

    python benchmarks/load_time.py model.Q4_K_M.gguf --llamacpp-python /work/llamacpp/bin/python --rounds 3
    python benchmarks/load_time.py HF_DIR --quantize int4 --tree /tmp/before   # quantized at load; an older checkout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]  # this checkout

# The child that loads, shared by both libraries: argv = model, quantize ("auto" or a mode); prints one JSON line.
CHILD = """
import json, resource, sys, threading, time
{imports}
peak = [0]
def sample():
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()
{load}
seconds = time.perf_counter() - started
time.sleep(0.05)
print(json.dumps({{"load_s": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "peak_anon_gib": peak[0] / 2**20}}))
"""
OURS = CHILD.format(imports="import llamaforge, torch", load="llamaforge.load(sys.argv[1], quantize=sys.argv[2])")
LLAMA_CPP = CHILD.format(imports="import llama_cpp", load="llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, "
                                                               "n_threads=2, verbose=False)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a GGUF file, an HF folder or any other source llamaforge loads")
    parser.add_argument("--quantize", default="auto", choices=["auto", "int8", "int4"],
                        help="llamaforge.load's quantize (default auto: a GGUF's quantized weights as stored)")
    parser.add_argument("--rounds", type=int, default=3, help="loads per side (default 3)")
    parser.add_argument("--llamacpp-python", help="a python with llama-cpp-python (../shared/tools/llamacpp-venv.sh)")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="another llamaforge checkout to time beside this one (put on PYTHONPATH); repeatable")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.llamacpp_python and (not args.model.is_file() or args.model.suffix != ".gguf"):
        parser.error("--llamacpp-python needs a .gguf file (llama.cpp loads nothing else)")
    return args


def sides(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each side's name and the command line of one load."""
    model = str(args.model.resolve())
    found = {"llamaforge": [sys.executable, "-c", OURS, model, args.quantize]}
    for tree in args.tree:
        found[f"llamaforge@{tree}"] = [sys.executable, "-c", OURS, model, args.quantize]
    if args.llamacpp_python:
        found["llama.cpp"] = [args.llamacpp_python, "-c", LLAMA_CPP, model]
    return found


def load_once(name: str, command: list[str]) -> dict:
    """One load in a fresh process: llamaforge's sides with their checkout first on PYTHONPATH, started outside any
    checkout (`python -c` puts its working folder first on sys.path, which would shadow PYTHONPATH)."""
    env = dict(os.environ)
    if name.startswith("llamaforge"):
        tree = name.split("@", 1)[1] if "@" in name else str(REPOSITORY)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        raise SystemExit(f"{name}: the load failed:\n{result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark(args: argparse.Namespace) -> dict:
    """Every side's loads, alternating (the order rotates each round), and each side's median against ours."""
    commands = sides(args)
    names = list(commands)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(load_once(name, commands[name]))
            print(f"round {round_index + 1}: {name} {runs[name][-1]['load_s']:.2f} s", file=sys.stderr)
    results = {}
    for name, measured in runs.items():
        seconds = [run["load_s"] for run in measured]
        results[name] = {"load_s": seconds, "median_s": statistics.median(seconds),
                         "peak_rss_gib": max(run["peak_rss_gib"] for run in measured),
                         "peak_anon_gib": max(run["peak_anon_gib"] for run in measured)}
    ours = results["llamaforge"]["median_s"]
    for row in results.values():
        row["vs_llamaforge"] = row["median_s"] / ours  # above 1: slower than this checkout
    return {"model": str(args.model), "quantize": args.quantize, "rounds": args.rounds, "results": results}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = benchmark(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']} (quantize={report['quantize']}), {report['rounds']} alternating rounds")
    print("| side | median s | every round | x llamaforge's time | peak RSS GiB | peak anonymous GiB |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name, row in report["results"].items():
        rounds = ", ".join(f"{s:.2f}" for s in row["load_s"])
        print(f"| {name} | {row['median_s']:.2f} | {rounds} | {row['vs_llamaforge']:.2f} | {row['peak_rss_gib']:.2f} "
              f"| {row['peak_anon_gib']:.2f} |")


if __name__ == "__main__":
    main()
