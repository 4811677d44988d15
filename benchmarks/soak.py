"""Soak test of the server: mixed valid, invalid and disconnecting traffic, then a check that nothing leaked.

The script serves a model (the built-in demo model, 1.9M parameters, unless `--model PATH`) in-process with
uvicorn on a free loopback port, and sends it `--requests` requests (2000) from `--concurrency` (64) concurrent
asyncio clients. Each request is drawn, by a `random.Random(--seed)`, from a mix of kinds (`KINDS`):

- valid: OpenAI chat and completions, whole and streamed; TGI /generate, /generate_stream and the compat
  route /; and a chat with 4 stop strings of 250,000 characters each (a 1 MB body, under the 1 MiB limit).
  Each must get 200 and a whole answer (a JSON body, or a stream that reaches its end without an in-band error).
- invalid: each must get its own 4xx (400 on OpenAI routes, 422 on TGI's, 413 for a 2 MB body): seeds and
  top_k past 64 bits, `"stream": "yes"`, `prompt: [true, false]`, a lone surrogate, `temperature: 1e999`,
  `max_tokens: 0`, 5 stop strings, an unknown role, a body that is not JSON.
- disconnecting: a stream read for 2 events and then closed; a chat without max_tokens whose client gives up
  after 0.3 s without an answer byte. Either is "disconnected (as intended)", or 200 if it ended first.

A 503 with Retry-After (the engine's queue is full) is counted apart and is no failure. A request that does
not end within `--request-timeout` seconds (other than the intended disconnects) is a hang. After the traffic
the engine has 10 s to become idle; then leaked slots = slots not free + requests still waiting, /health
must answer 200 and /metrics is fetched (its size is reported). Exit code 1 on any 5xx, hang, leaked slot,
unexpected outcome (a valid request refused, an invalid one answered, a 4xx other than the kind's) or
unhealthy server; 0 otherwise, so the script serves as a check.

    python benchmarks/soak.py                                 # 2000 requests at 64 concurrent, demo model
    python benchmarks/soak.py --requests 120 --concurrency 16 # a smoke test, seconds
    python benchmarks/soak.py --model PATH --json             # another model; the report as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import LiveServer  # noqa: E402

import llamaforge  # noqa: E402
from llamaforge.engine import Engine  # noqa: E402
from llamaforge.server import create_app  # noqa: E402

QUESTION = "What is 12 + 30?"
JSON_HEADERS = {"content-type": "application/json"}
GIVE_UP_AFTER = httpx.Timeout(30, read=0.3)  # the impatient client: no answer byte within 0.3 s and it leaves
IDLE_WAIT_S = 10.0  # how long the engine gets, after the traffic, to free every slot
OUTCOMES = ("answered", "4xx", "5xx", "busy", "disconnected", "hang", "transport error")
OUTCOME_NAMES = {"answered": "answered (2xx)", "4xx": "4xx", "5xx": "5xx", "busy": "503 queue full (Retry-After)",
                 "disconnected": "disconnected (as intended)", "hang": "hangs", "transport error": "transport errors"}


# --- what a client sees ----------------------------------------------------------------------------

@dataclass
class Answer:
    """What the client saw of one request."""

    status: int | None = None
    retry_after: str | None = None
    complete: bool = False  # the whole answer arrived in its protocol's shape
    disconnected: bool = False  # the client left on purpose before the end
    detail: str = ""


Sender = Callable[[httpx.AsyncClient, str, bytes], Awaitable[Answer]]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def read_whole(client: httpx.AsyncClient, path: str, body: bytes) -> Answer:
    """POST and read the whole answer; complete if it is JSON."""
    response = await client.post(path, content=body, headers=JSON_HEADERS)
    return Answer(response.status_code, response.headers.get("retry-after"), _is_json(response.text),
                  detail=response.text[:300])


def _stream_event(line: str) -> tuple[bool, str | None]:
    """(whether the line ends the stream, an in-band error if it holds one) for an OpenAI or TGI event line."""
    if not line.startswith("data:"):
        return False, None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return True, None
    payload = json.loads(data)
    if "error" in payload:
        return True, data[:300]
    return payload.get("generated_text") is not None, None  # TGI's last event holds the whole text


async def read_events(client: httpx.AsyncClient, path: str, body: bytes, close_after: int | None = None) -> Answer:
    """POST a streaming request and read its events to the end (or close the connection after `close_after`)."""
    async with client.stream("POST", path, content=body, headers=JSON_HEADERS) as response:
        answer = Answer(response.status_code, response.headers.get("retry-after"))
        if response.status_code != 200:
            answer.detail = (await response.aread()).decode(errors="replace")[:300]
            answer.complete = True
            return answer
        events = 0
        async for line in response.aiter_lines():
            ended, error = _stream_event(line)
            events += line.startswith("data:")
            if error is not None:
                answer.detail = f"in-band error: {error}"
                return answer
            if ended:
                answer.complete = True
                return answer
            if close_after is not None and events >= close_after:
                answer.disconnected = True  # leaving the block closes the connection mid-stream
                return answer
        answer.detail = f"the stream ended after {events} events without its last one"
        return answer


async def read_stream(client: httpx.AsyncClient, path: str, body: bytes) -> Answer:
    """Read a stream to its end."""
    return await read_events(client, path, body)


async def close_after_two(client: httpx.AsyncClient, path: str, body: bytes) -> Answer:
    """Read two events of a stream, then hang up."""
    return await read_events(client, path, body, close_after=2)


async def give_up_reading(client: httpx.AsyncClient, path: str, body: bytes) -> Answer:
    """POST and wait 0.3 s at most for the answer's first byte, then hang up."""
    try:
        response = await client.post(path, content=body, headers=JSON_HEADERS, timeout=GIVE_UP_AFTER)
    except httpx.ReadTimeout:
        return Answer(disconnected=True)
    return Answer(response.status_code, response.headers.get("retry-after"), _is_json(response.text),
                  detail=response.text[:300])


# --- the mix ---------------------------------------------------------------------------------------

def _json(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def chat(rng: random.Random, **extra) -> dict:
    """A valid OpenAI chat body with drawn max_tokens, temperature and seed."""
    return {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": rng.randint(16, 64),
            "temperature": rng.choice([0, 0.7]), "seed": rng.randrange(1 << 31)} | extra


def completion(rng: random.Random, **extra) -> dict:
    """A valid OpenAI completions body."""
    return {"model": "demo", "prompt": QUESTION, "max_tokens": rng.randint(16, 64),
            "temperature": rng.choice([0, 0.7]), "seed": rng.randrange(1 << 31)} | extra


def tgi(rng: random.Random, stream: bool = False, **parameters) -> dict:
    """A valid TGI body: greedy or sampled, with a drawn max_new_tokens and seed."""
    sampled = {"do_sample": True, "temperature": 0.7} if rng.random() < 0.5 else {}
    return {"inputs": QUESTION, "stream": stream, "parameters": {"max_new_tokens": rng.randint(16, 64),
                                                                  "seed": rng.randrange(1 << 31), **sampled,
                                                                  **parameters}}


def long_stops(rng: random.Random) -> bytes:
    """A valid chat whose 4 stop strings are 250,000 characters each (about 1 MB, within the body limit)."""
    return _json(chat(rng, stop=[letter * 250_000 for letter in rng.sample("abcdefgh", 4)]))


@dataclass(frozen=True)
class Kind:
    """One sort of request in the mix: its route, how its body is drawn and read, and the status it must get."""

    name: str
    group: str  # "valid", "invalid" or "disconnecting"
    weight: float
    path: str
    body: Callable[[random.Random], bytes]
    send: Sender = read_whole
    expect: int = 200


def _invalid(name: str, path: str, body: Callable[[random.Random], bytes], expect: int) -> Kind:
    return Kind(name, "invalid", 1.5, path, body, expect=expect)


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HUGE = 1 << 64  # past every 64-bit integer
RAW_USER = '"messages":[{"role":"user","content":"What is 12 + 30?"}]'
KINDS = [
    Kind("chat", "valid", 10, CHAT, lambda rng: _json(chat(rng))),
    Kind("chat stream", "valid", 8, CHAT, lambda rng: _json(chat(rng, stream=True)), read_stream),
    Kind("completion", "valid", 6, COMPLETIONS, lambda rng: _json(completion(rng))),
    Kind("completion stream", "valid", 5, COMPLETIONS, lambda rng: _json(completion(rng, stream=True)), read_stream),
    Kind("generate", "valid", 6, "/generate", lambda rng: _json(tgi(rng))),
    Kind("generate_stream", "valid", 5, "/generate_stream", lambda rng: _json(tgi(rng)), read_stream),
    Kind("compat /", "valid", 3, "/", lambda rng: _json(tgi(rng))),
    Kind("compat / stream", "valid", 2, "/", lambda rng: _json(tgi(rng, stream=True)), read_stream),
    Kind("4 stops of 250k chars", "valid", 1, CHAT, long_stops),
    _invalid("seed 2**64", CHAT, lambda rng: _json(chat(rng, seed=HUGE)), 400),
    _invalid("TGI seed 2**64", "/generate", lambda rng: _json(tgi(rng, seed=HUGE)), 422),
    _invalid("TGI top_k 2**64", "/generate", lambda rng: _json(tgi(rng, top_k=HUGE)), 422),
    _invalid('"stream": "yes"', CHAT, lambda rng: _json(chat(rng, stream="yes")), 400),
    _invalid("prompt [true, false]", COMPLETIONS, lambda rng: _json(completion(rng, prompt=[True, False])), 400),
    _invalid("lone surrogate", CHAT, lambda rng: b'{"messages":[{"role":"user","content":"\\ud800"}]}', 400),
    _invalid("temperature 1e999", CHAT, lambda rng: f'{{{RAW_USER},"temperature":1e999}}'.encode(), 400),
    _invalid("max_tokens 0", CHAT, lambda rng: _json(chat(rng, max_tokens=0)), 400),
    _invalid("5 stop strings", CHAT, lambda rng: _json(chat(rng, stop=["a", "b", "c", "d", "e"])), 400),
    _invalid("unknown role", CHAT, lambda rng: _json(chat(rng, messages=[{"role": "wizard", "content": "hi"}])), 400),
    _invalid("not JSON", CHAT, lambda rng: b'{"messages": [{"role": "user", "content": "hi"', 400),
    _invalid("2 MB body", COMPLETIONS, lambda rng: _json(completion(rng, prompt="x" * (2 << 20))), 413),
    Kind("stream closed after 2 events", "disconnecting", 4, CHAT, lambda rng: _json(chat(rng, stream=True)),
         close_after_two),
    Kind("TGI stream closed after 2 events", "disconnecting", 2, "/generate_stream", lambda rng: _json(tgi(rng)),
         close_after_two),
    Kind("chat, no max_tokens, read timeout 0.3 s", "disconnecting", 4, CHAT,
         lambda rng: _json({"messages": [{"role": "user", "content": QUESTION}], "seed": rng.randrange(1 << 31)}),
         give_up_reading),
]


# --- one request -----------------------------------------------------------------------------------

@dataclass
class Result:
    """One request: its kind, its outcome (one of OUTCOMES), whether that was what the kind must get."""

    kind: Kind
    outcome: str
    expected: bool
    status: int | None
    latency_s: float  # from sending it to its end
    detail: str = ""


def outcome_of(kind: Kind, answer: Answer) -> tuple[str, bool]:
    """(outcome, whether it is what the kind must get); 5xx are failures of their own, not "unexpected"."""
    if answer.disconnected:
        return "disconnected", kind.group == "disconnecting"
    status = answer.status or 0
    if status == 503 and answer.retry_after:
        return "busy", True
    if 200 <= status < 300:
        return "answered", kind.expect == 200 and answer.complete
    if 400 <= status < 500:
        return "4xx", status == kind.expect
    return "5xx", True


async def send_one(client: httpx.AsyncClient, kind: Kind, seed: int, timeout: float) -> Result:
    """Build the request's body from its seed, send it, and classify what came back."""
    body = kind.body(random.Random(seed))
    start = time.perf_counter()
    try:
        answer = await asyncio.wait_for(kind.send(client, kind.path, body), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:  # asyncio.TimeoutError is not TimeoutError in 3.10
        return Result(kind, "hang", True, None, time.perf_counter() - start, f"no end within {timeout:g} s: {exc!r}")
    except httpx.TransportError as exc:
        return Result(kind, "transport error", False, None, time.perf_counter() - start, repr(exc))
    outcome, expected = outcome_of(kind, answer)
    return Result(kind, outcome, expected, answer.status, time.perf_counter() - start, answer.detail)


def draw_plan(requests: int, seed: int) -> list[tuple[Kind, int]]:
    """Each request's kind and body seed, drawn up front so the mix does not depend on timing."""
    rng = random.Random(seed)
    kinds = rng.choices(KINDS, weights=[k.weight for k in KINDS], k=requests)
    return [(kind, rng.randrange(1 << 32)) for kind in kinds]


async def run_traffic(client: httpx.AsyncClient, plan: list[tuple[Kind, int]], concurrency: int,
                      timeout: float) -> list[Result]:
    """Send the plan with at most `concurrency` requests in flight."""
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(kind: Kind, seed: int) -> Result:
        async with semaphore:
            return await send_one(client, kind, seed, timeout)

    return await asyncio.gather(*(bounded(kind, seed) for kind, seed in plan))


# --- after the traffic -----------------------------------------------------------------------------

async def wait_idle(engine: Engine, timeout: float) -> float:
    """Seconds until every slot is free and nothing waits (or `timeout`, if that never happens)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        stats = engine.stats()
        if stats.free_slots == engine.max_batch_size and not stats.waiting:
            break
        await asyncio.sleep(0.05)
    return time.perf_counter() - start


async def inspect_server(client: httpx.AsyncClient, engine: Engine) -> dict:
    """Leaked slots, health and the size of /metrics once the engine has had IDLE_WAIT_S to go idle."""
    idle_after = await wait_idle(engine, IDLE_WAIT_S)
    stats = engine.stats()
    health = await client.get("/health")
    metrics = await client.get("/metrics")
    return {"idle_after_s": idle_after, "free_slots": stats.free_slots, "max_batch_size": engine.max_batch_size,
            "waiting": stats.waiting, "leaked_slots": engine.max_batch_size - stats.free_slots + stats.waiting,
            "health_status": health.status_code, "engine_health": engine.health(),
            "metrics_bytes": len(metrics.content), "engine_steps": stats.steps,
            "generated_tokens": stats.generated_tokens, "peak_running": stats.peak_running}


class LogCollector(logging.Handler):
    """Keeps the server's warnings and errors (uvicorn's and llamaforge's) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {self.format(record)}")


# --- the report ------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolating linearly between the closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _label(result: Result) -> str:
    """How a result shows in a kind's outcome counts: its status, or its outcome where it has none."""
    if result.outcome in ("disconnected", "hang", "transport error") or result.status is None:
        return result.outcome
    return str(result.status)


def summarize_kinds(results: list[Result]) -> list[dict]:
    """Per kind: requests, outcome counts, unexpected ones, latency p50/p95 of those answered (2xx or 4xx)."""
    rows = []
    for kind in KINDS:
        mine = [r for r in results if r.kind is kind]
        if not mine:
            continue
        answered = [r.latency_s for r in mine if r.outcome in ("answered", "4xx")]
        rows.append({"kind": kind.name, "group": kind.group, "path": kind.path, "expect": kind.expect,
                     "requests": len(mine), "outcomes": dict(Counter(_label(r) for r in mine)),
                     "unexpected": sum(not r.expected for r in mine),
                     "p50_s": percentile(answered, 50), "p95_s": percentile(answered, 95)})
    return rows


def summarize_groups(results: list[Result]) -> dict:
    """Per group (valid, invalid, disconnecting): requests and outcome counts."""
    groups = {}
    for group in ("valid", "invalid", "disconnecting"):
        mine = [r for r in results if r.kind.group == group]
        groups[group] = {"requests": len(mine), **{o: sum(r.outcome == o for r in mine) for o in OUTCOMES}}
    return groups


def _valid_whole(result: Result) -> bool:
    """Whether the result is a valid non-streaming request that was answered."""
    return result.kind.group == "valid" and result.kind.send is read_whole and result.outcome == "answered"


def failures(totals: dict, server: dict) -> list[str]:
    """Why the soak fails (empty when it passes)."""
    counted = {"5xx": "5xx", "hang": "hangs", "unexpected": "unexpected"}
    reasons = [f"{totals[name]} {label}" for name, label in counted.items() if totals[name]]
    if server["leaked_slots"]:
        reasons.append(f"{server['leaked_slots']} leaked slots")
    if server["health_status"] != 200 or server["engine_health"] is not None:
        reasons.append(f"/health {server['health_status']}: {server['engine_health']}")
    return reasons


def report(args: argparse.Namespace, setup: dict, results: list[Result], wall: float, server: dict,
           log_lines: list[str]) -> dict:
    """JSON-ready: the setup, totals, per group and per kind counts, latency, the server after, failures."""
    totals = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    totals["unexpected"] = sum(not r.expected for r in results)
    whole = [r.latency_s for r in results if _valid_whole(r)]
    bad = [r for r in results if not r.expected or r.outcome in ("5xx", "hang")]
    reasons = failures(totals, server)
    return {
        "setup": setup | {"requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
                          "max_batch_size": args.max_batch_size, "max_queue": args.max_queue,
                          "request_timeout_s": args.request_timeout},
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "totals": totals,
        "groups": summarize_groups(results),
        "kinds": summarize_kinds(results),
        "valid_non_streaming_latency": {"requests": len(whole), "p50_s": percentile(whole, 50),
                                        "p95_s": percentile(whole, 95)},
        "server": server,
        "server_log": log_lines[:20],
        "server_log_lines": len(log_lines),
        "failed_requests": [{"kind": r.kind.name, "path": r.kind.path, "outcome": r.outcome, "status": r.status,
                             "expected_status": r.kind.expect, "detail": r.detail} for r in bad[:20]],
        "failures": reasons,
        "ok": not reasons,
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _latencies(summary: dict) -> str:
    return f"p50 {_seconds(summary['p50_s'])} s, p95 {_seconds(summary['p95_s'])} s ({summary['requests']} requests)"


def format_table(report: dict) -> str:
    """The report as Markdown-ish tables: outcomes, then each kind; the server afterwards; pass or fail."""
    setup, server, latency = report["setup"], report["server"], report["valid_non_streaming_latency"]
    lines = [
        f"soak: {setup['requests']} requests at {setup['concurrency']} concurrent (seed {setup['seed']}), model "
        f"{setup['model']} ({setup['parameters'] / 1e6:.1f}M parameters, {setup['device']}), max batch "
        f"{setup['max_batch_size']}, max queue {setup['max_queue']}",
        f"wall {report['wall_s']:.1f} s, {report['requests_per_s']:.1f} requests/s; valid non-streaming latency "
        f"{_latencies(latency)}",
        "",
        "| outcome | requests |",
        "|---|---:|",
        *(f"| {OUTCOME_NAMES[o]} | {report['totals'][o]} |" for o in OUTCOMES),
        f"| unexpected | {report['totals']['unexpected']} |",
        f"| leaked slots | {server['leaked_slots']} |",
        "",
        "| kind | group | expect | requests | outcomes | unexpected | p50 s | p95 s |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in report["kinds"]:
        outcomes = ", ".join(f"{label}: {n}" for label, n in sorted(row["outcomes"].items()))
        expect = f"{row['expect']} or hang-up" if row["group"] == "disconnecting" else row["expect"]
        lines.append(f"| {row['kind']} | {row['group']} | {expect} | {row['requests']} | {outcomes} "
                     f"| {row['unexpected']} | {_seconds(row['p50_s'])} | {_seconds(row['p95_s'])} |")
    lines += [
        "",
        f"after: engine idle after {server['idle_after_s']:.2f} s, {server['free_slots']}/{server['max_batch_size']} "
        f"slots free, {server['waiting']} waiting, /health {server['health_status']}, /metrics "
        f"{server['metrics_bytes']} bytes, {server['generated_tokens']} tokens in {server['engine_steps']} steps; "
        f"{report['server_log_lines']} server log lines at WARNING or above",
    ]
    lines += [f"  {line}" for line in report["server_log"]]
    lines += [f"  failed: {r['kind']} ({r['path']}): {r['outcome']} {r['status']}, expected {r['expected_status']}: "
              f"{r['detail']}" for r in report["failed_requests"]]
    lines.append("PASS" if report["ok"] else "FAIL: " + ", ".join(report["failures"]))
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="how many requests to send")
    parser.add_argument("--concurrency", type=int, default=64, help="how many requests in flight at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mix and of every body")
    parser.add_argument("--model", help="model to serve (default: the built-in demo model)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the engine's slots")
    parser.add_argument("--max-queue", type=int, default=256, help="the engine's waiting queue")
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="a request not over after this many seconds is a hang")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.max_batch_size, args.max_queue) < 1 or args.request_timeout <= 0:
        parser.error("--requests, --concurrency, --max-batch-size, --max-queue and --request-timeout must be positive")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def soak(args: argparse.Namespace, url: str, engine: Engine) -> tuple[list[Result], float, dict]:
    """The traffic, its wall time, and the server's state after it."""
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        start = time.perf_counter()
        results = await run_traffic(client, draw_plan(args.requests, args.seed), args.concurrency,
                                    args.request_timeout)
        wall = time.perf_counter() - start
        return results, wall, await inspect_server(client, engine)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    llm = llamaforge.load(args.model)
    setup = {"model": args.model or "demo", "parameters": sum(p.numel() for p in llm.model.parameters()),
             "device": str(llm.device)}
    engine = Engine(llm, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    collector = LogCollector()
    for name in ("uvicorn", "llamaforge"):
        logging.getLogger(name).addHandler(collector)
    with LiveServer(create_app(llm, engine, api_key=None, model_name="demo")) as server:
        log(f"serving {setup['model']} at {server.url}; {args.requests} requests at {args.concurrency} concurrent")
        results, wall, after = asyncio.run(soak(args, server.url, engine))
    report_ = report(args, setup, results, wall, after, collector.lines)
    print(json.dumps(report_, indent=2) if args.json else format_table(report_))
    return 0 if report_["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
