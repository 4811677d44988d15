"""Structured output: that every schema-constrained answer parses and validates, and what the grammar costs a token.

1. Engine run: `--requests` chat requests for a JSON object matching a schema (the demo model, sampled, 8 at a
   time), through the engine as the server runs them; every answer must parse and validate. The same prompts run
   unconstrained with each answer's token budget, alternating with the constrained run; ms per generated token
   of both (the engine's wall time over its tokens) and their difference are reported.
2. Mask cost alone: computing the allowed-token mask and taking a token, per token, for the demo vocabulary and,
   where ../shared/assets has it, Llama 2's 32000-token one (random logits pick among the allowed tokens).

    python benchmarks/structured.py --requests 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import pydantic
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factories import SHARED_ASSETS  # noqa: E402

import llamaforge  # noqa: E402
from llamaforge.engine import Engine, EngineRequest  # noqa: E402
from llamaforge.sampling import SamplingParams  # noqa: E402
from llamaforge.structured import Constraint, json_schema_grammar  # noqa: E402
from llamaforge.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population", "capital"],
          "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20},
                         "population": {"type": "integer", "minimum": 0}, "capital": {"type": "boolean"}}}


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population: int = pydantic.Field(ge=0)
    capital: bool


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams],
        grammar: str | None) -> tuple[float, list[list[int]], list[str | None]]:
    """(wall seconds, each answer's ids, each finish reason) of all prompts submitted at once."""
    answers: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    done = threading.Semaphore(0)

    def emitter(index: int):
        def emit(event) -> None:
            if isinstance(event, BaseException):
                reasons[index] = repr(event)
                done.release()
                return
            if not event.eos:
                answers[index].append(event.token_id)
            if event.finish_reason:
                reasons[index] = event.finish_reason
                done.release()
        return emit

    started = time.perf_counter()
    for index, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        constraint = Constraint(engine.llm.tokenizer, grammar) if grammar else None
        engine.submit(EngineRequest(prompt, p, emitter(index), constraint=constraint))
    for _ in prompts:
        done.acquire()
    return time.perf_counter() - started, answers, reasons


def mask_cost(tokenizer: Tokenizer, tokens: int = 400) -> float:
    """Microseconds a token to compute the mask and take a token, on random logits, restarting at each end."""
    grammar = json_schema_grammar(SCHEMA)
    spent, taken = 0.0, 0
    generator = torch.Generator().manual_seed(0)
    while taken < tokens:
        constraint = Constraint(tokenizer, grammar)
        for _ in range(200):
            logits = torch.randn(tokenizer.vocab_size, generator=generator)
            started = time.perf_counter()
            token = int(logits.masked_fill(~constraint.allowed(), float("-inf")).argmax())
            constraint.accept(token)
            spent += time.perf_counter() - started
            taken += 1
            if token == tokenizer.eos_id:
                break
    return spent / taken * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8, help="requests decoded together")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of the timing comparison")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    llm = llamaforge.load()
    engine = Engine(llm, max_batch_size=args.batch, max_queue=args.requests).start()
    countries = ["France", "Japan", "Peru", "Kenya", "Canada", "Norway", "India", "Chile"]
    questions = [f"Give a city of {countries[i % 8]} as JSON (request {i})." for i in range(args.requests)]
    prompts = [llm.chat_tokens([{"role": "user", "content": question}]) for question in questions]
    sampled = [SamplingParams(max_new_tokens=96, temperature=0.8, top_p=0.95, seed=i) for i in range(args.requests)]
    grammar = json_schema_grammar(SCHEMA)
    try:
        run(engine, prompts[:args.batch], sampled[:args.batch], grammar)  # warm-up
        _, answers, reasons = run(engine, prompts, sampled, grammar)
        valid = 0
        for ids, reason in zip(answers, reasons, strict=True):
            try:
                City.model_validate_json(llm.tokenizer.decode(ids))
                valid += reason == "stop"
            except pydantic.ValidationError:
                pass
        # The same token counts unconstrained (ignore_eos: each answer as long as its constrained twin).
        budgets = [SamplingParams(max_new_tokens=max(1, len(ids)), temperature=0.8, top_p=0.95, seed=i,
                                  ignore_eos=True) for i, ids in enumerate(answers)]
        timings: dict[str, list[float]] = {"constrained": [], "free": []}
        for repeat in range(args.repeats):
            for name in (("constrained", "free") if repeat % 2 == 0 else ("free", "constrained")):
                seconds, got, _ = run(engine, prompts, sampled if name == "constrained" else budgets,
                                      grammar if name == "constrained" else None)
                timings[name].append(seconds / sum(len(ids) for ids in got) * 1e3)
    finally:
        engine.stop()
    costs = {"demo vocabulary": mask_cost(llm.tokenizer)}
    llama2 = SHARED_ASSETS / "llama2-tokenizer" / "tokenizer.model"
    if llama2.exists():
        costs["Llama 2 vocabulary (32000)"] = mask_cost(Tokenizer(llama2))
    report = {
        "requests": args.requests, "valid": valid, "sample": llm.tokenizer.decode(answers[0]),
        "ms_per_token": {name: statistics.median(values) for name, values in timings.items()},
        "ms_per_token_runs": timings, "mask_us_per_token": costs, "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{valid} of {args.requests} answers parse and validate; e.g. {report['sample']}")
    ms = report["ms_per_token"]
    print(f"engine ms per generated token: constrained {ms['constrained']:.2f}, free {ms['free']:.2f} "
          f"(+{ms['constrained'] - ms['free']:.2f}); runs {timings}")
    for name, cost in costs.items():
        print(f"mask + take, {name}: {cost:.0f} us per token")


if __name__ == "__main__":
    main()
