"""Many adapters on one base: throughput of 16 concurrent clients spread over the base and 4 LoRA adapters, against
the same traffic on the base alone (a server without adapters), through the engine as the server runs it.

One random-weight model (bfloat16, 134M parameters: dim 768, 12 layers, the shape benchmarks/serve.py serves) and 4
random rank-16 adapters on every projection. Both sides get the same requests (random token prompts of 64 tokens,
64 new tokens, greedy, all submitted at once, 16 decoded together); they alternate, `--repeats` rounds, medians.

    python benchmarks/adapters.py                 # about 2 minutes
    python benchmarks/adapters.py --requests 8 --repeats 1 --json   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factories import random_model  # noqa: E402

from llamaforge.adapters import AdapterStack  # noqa: E402
from llamaforge.api import LLM  # noqa: E402
from llamaforge.config import ModelArgs  # noqa: E402
from llamaforge.engine import Engine, EngineRequest  # noqa: E402
from llamaforge.lora import LoraConfig, add_lora, lora_layers, save_adapter  # noqa: E402
from llamaforge.quantize import use_bf16_kernel, use_fused_decode  # noqa: E402
from llamaforge.sampling import SamplingParams  # noqa: E402

CONFIG = ModelArgs(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=32000, max_seq_len=1024)


def write_adapters(base: torch.nn.Module, directory: Path, count: int, rank: int) -> list[Path]:
    paths = []
    for index in range(count):
        model = add_lora(copy.deepcopy(base).float(), LoraConfig(r=rank, alpha=2 * rank, dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.01)
        paths.append(save_adapter(model, directory / f"adapter{index}"))
    return paths


def run(engine: Engine, prompts: list[list[int]], adapters: list[int], params: SamplingParams) -> tuple[float, list]:
    """(wall seconds, every answer's ids) of all requests submitted at once."""
    answers: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def emitter(index: int):
        def emit(event) -> None:
            if isinstance(event, BaseException):
                raise event
            answers[index].append(event.token_id)
            if event.finish_reason:
                done.release()
        return emit

    started = time.perf_counter()
    for index, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        engine.submit(EngineRequest(prompt, params, emitter(index), adapter=adapter))
    for _ in prompts:
        done.acquire()
    return time.perf_counter() - started, answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16, help="requests decoded together")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    base = random_model(CONFIG, seed=0).eval()
    with tempfile.TemporaryDirectory() as directory:
        paths = write_adapters(base, Path(directory), args.adapters, args.rank)
        models = {}
        for side in ("base alone", "base + adapters"):
            model = copy.deepcopy(base).to(torch.bfloat16)
            use_bf16_kernel(model)  # as load() sets a bfloat16 CPU model up
            use_fused_decode(model)
            llm = LLM(model, tokenizer=None)
            if side == "base + adapters":
                llm.adapters = AdapterStack(model, max_adapters=args.adapters, max_rank=args.rank)
                for index, path in enumerate(paths):
                    llm.adapters.add(f"adapter{index}", path)
            models[side] = llm
    generator = torch.Generator().manual_seed(1)
    prompts = [[1, *torch.randint(3, CONFIG.vocab_size, (63,), generator=generator).tolist()]
               for _ in range(args.requests)]
    params = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    spread = [index % (args.adapters + 1) for index in range(args.requests)]  # slot 0: the base
    workloads = {"base alone": [0] * args.requests, "base + adapters": spread}
    rates: dict[str, list[float]] = {side: [] for side in models}

    def serve(side: str, count: int, slots: list[int]) -> tuple[float, list]:
        # A new engine (and worker thread) each run: one OpenMP pool alive at a time, as in a server (two idle
        # pools' spinning workers starve the running one under `chrt -f`), and no prefix cached from a run before.
        engine = Engine(models[side], max_batch_size=args.clients, max_queue=args.requests).start()
        try:
            return run(engine, prompts[:count], slots[:count], params)
        finally:
            engine.stop()

    together = min(args.clients, args.requests)  # one batch's worth
    for side in models:  # warm-up
        serve(side, together, workloads[side])
    for repeat in range(args.repeats):
        for side in (list(models) if repeat % 2 == 0 else list(models)[::-1]):
            seconds, answers = serve(side, args.requests, workloads[side])
            rates[side].append(sum(map(len, answers)) / seconds)
    # The base's requests answer alike on both sides (the adapters' rows change nothing for them).
    _, plain = serve("base alone", together, [0] * together)
    _, mixed = serve("base + adapters", together, spread)
    same_base = all(a == b for a, b, slot in zip(plain, mixed, spread, strict=False) if slot == 0)
    medians = {side: statistics.median(values) for side, values in rates.items()}
    report = {"requests": args.requests, "clients": args.clients, "adapters": args.adapters, "rank": args.rank,
              "tok_s": medians, "runs": rates, "ratio": medians["base + adapters"] / medians["base alone"],
              "base_rows_same": same_base, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.clients} clients, {args.requests} requests x 64 tokens: base alone {medians['base alone']:.1f} "
          f"tok/s, base + {args.adapters} adapters {medians['base + adapters']:.1f} tok/s: {report['ratio']:.2f}x "
          f"(runs {rates}); base rows equal: {same_base}")


if __name__ == "__main__":
    main()
