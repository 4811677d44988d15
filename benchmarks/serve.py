"""Serving throughput and time to first token: continuous batching against one request at a time and llama.cpp.

The script writes a random-weight HF directory and serves it in up to three servers, each in its own
process, all up for the whole run:

- (a) continuous batching: `llamaforge serve --max-batch-size 32` (the engine decodes up to 32 sequences
  per step);
- (b) one request at a time: the same engine with `--max-batch-size 1`, so later requests wait in its queue;
- (c) llama.cpp's server: `llama-server` on the same weights exported with `llamaforge export` (float32
  GGUF), with as many parallel slots as (a) has (`-np 32`, continuous batching) and the same threads.
  It runs when `--llama-server PATH` (or LLAMAFORGE_LLAMA_SERVER) names the binary; otherwise it is
  printed and recorded as skipped. llama-cpp-python does not ship it: build it from llama.cpp's source
  (`cmake -B build && cmake --build build --target llama-server`).

With `--weights q8_0` or `q4_0` every server serves the same GGUF file of that type, written by `llamaforge export
--type q8_0|q4_0` (block for block what llama.cpp's quantizer writes; output.weight Q8_0): llamaforge keeps its
Q8_0 / Q4_0 linears quantized (int8 / int4 kernels, bfloat16 activations), llama.cpp runs them as it does. The
default, f32, serves the float32 HF directory to (a) and (b) and a float32 GGUF to (c).

For each concurrency level (1, 8 and 32 clients by default) an asyncio client opens that many streaming
`/v1/completions` connections; each client sends its next request as soon as its previous one has ended,
until the level's requests are used up. Both servers get exactly the same requests: token-id prompts of
mixed lengths (`--prompt-lens`, cycled), `temperature: 0`, `max_tokens` fixed. The levels run in turn,
(a) then (b) at each level, so drift in the machine hits both alike.

- output tok/s: completion tokens of all the level's requests (the `usage` the server reports) / wall time
  from the first request sent to the last stream closed.
- TTFT: from sending a request to receiving its first chunk that carries a token (p50 and p99).
- TPOT: per request, (last token time - first token time) / (tokens - 1), the decode pace a client sees.
- mean batch: completion tokens / engine steps during the level (from the server's /metrics): how many
  sequences the engine decoded per step on average.
- other load: cores used during the level by processes other than the servers and the clients (from
  /proc/stat). The machine may be shared, so before each measurement the script waits (`--quiet-wait`)
  until other processes use fewer than `--quiet-below` cores, and it reports this column either way.

The EOS row of the random model's classifier is zeroed, so its logit is always exactly 0 and greedy decoding
never picks it: every request generates `max_tokens` tokens. The tokens actually generated are still counted
and reported. Each server answers a few warm-up requests before it is measured.

    python benchmarks/serve.py                      # 134M-parameter model, about 8 minutes on 2 cores
    python benchmarks/serve.py --llama-server ~/llama.cpp/build/bin/llama-server   # with (c)
    python benchmarks/serve.py --preset tiny        # smoke test, about 10 seconds
    python benchmarks/serve.py --json               # the results as JSON (every request included)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import SHARED_ASSETS, random_model, train_tokenizer, write_hf_dir  # noqa: E402

from llamaforge.config import ModelArgs  # noqa: E402

LLAMA2_TOKENIZER = SHARED_ASSETS / "llama2-tokenizer" / "tokenizer.model"
LLAMA_CPP_SKIPPED = "no llama-server binary given (--llama-server PATH or LLAMAFORGE_LLAMA_SERVER)"


@dataclass(frozen=True)
class Preset:
    """A model shape and the workload defaults that fit its speed."""

    config: ModelArgs
    llama2_tokenizer: bool  # the Llama 2 tokenizer (32000 tokens), else one trained on the fly with `vocab`
    vocab: int
    max_tokens: int
    rounds: int
    min_requests: int
    prompt_lens: tuple[int, ...]
    quiet_wait: float  # seconds to wait for other processes to quieten down before each measurement


PRESETS = {
    # 134M parameters (85M in the decoder layers), 537 MB in float32.
    "small": Preset(ModelArgs(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=32000, max_seq_len=1024),
                    llama2_tokenizer=True, vocab=32000, max_tokens=64, rounds=2, min_requests=8,
                    prompt_lens=(16, 32, 64, 128), quiet_wait=120.0),
    "tiny": Preset(ModelArgs(dim=64, n_layers=2, n_heads=4, hidden_dim=172, vocab_size=400, max_seq_len=256),
                   llama2_tokenizer=False, vocab=400, max_tokens=16, rounds=1, min_requests=4,
                   prompt_lens=(8, 16, 32), quiet_wait=0.0),
}


@dataclass
class RequestResult:
    """One streamed request as the client saw it (times in seconds from the level's start)."""

    prompt_tokens: int
    completion_tokens: int = 0
    chunks: int = 0
    sent: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    done: float = 0.0
    finish_reason: str | None = None
    text: str = ""

    @property
    def ttft(self) -> float:
        return (self.first_token if self.first_token is not None else self.done) - self.sent

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.last_token is None or self.chunks < 2:
            return None
        return (self.last_token - self.first_token) / (self.chunks - 1)


@dataclass
class LevelResult:
    """One server at one concurrency level."""

    server: str
    clients: int
    requests: int
    wall_s: float
    prompt_tokens: int
    completion_tokens: int
    engine_steps: int
    peak_batch: int
    tok_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_ms: float | None
    mean_batch: float | None
    server_cpu_cores: float  # CPU time of the measured server / wall time
    client_cpu_cores: float  # CPU time of this process (the clients) / wall time
    other_cpu_cores: float  # CPU time of everything else on the machine / wall time: other people's load
    runs: list[RequestResult] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model shape and workload")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--batch-size", type=int, default=32, help="--max-batch-size of the batching server (a)")
    parser.add_argument("--max-tokens", type=int, help="max_tokens of every request (default: the preset's)")
    parser.add_argument("--prompt-lens", help="comma-separated prompt lengths in tokens, cycled over the requests")
    parser.add_argument("--rounds", type=int, help="requests per client at each level (default: the preset's)")
    parser.add_argument("--min-requests", type=int, help="at least this many requests per level")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model to use (its vocabulary sets the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    parser.add_argument("--quiet-below", type=float, default=0.3,
                        help="before each measurement, wait until other processes use fewer cores than this")
    parser.add_argument("--quiet-wait", type=float, help="wait at most this many seconds for that (default: the "
                        "preset's, 120 s; 0 for tiny)")
    parser.add_argument("--llama-server", type=Path, default=os.environ.get("LLAMAFORGE_LLAMA_SERVER"),
                        help="llama.cpp's llama-server binary, for server (c)")
    parser.add_argument("--weights", default="f32", choices=("f32", "q8_0", "q4_0"),
                        help="what every server serves: float32 (default), or one Q8_0 / Q4_0 GGUF file for all")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.llama_server is not None and not Path(args.llama_server).is_file():
        parser.error(f"--llama-server {args.llama_server} does not exist")
    preset = PRESETS[args.preset]
    args.max_tokens = args.max_tokens or preset.max_tokens
    args.rounds = args.rounds or preset.rounds
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else preset.quiet_wait
    args.min_requests = args.min_requests if args.min_requests is not None else preset.min_requests
    args.prompt_lens = [int(n) for n in args.prompt_lens.split(",")] if args.prompt_lens else list(preset.prompt_lens)
    args.clients = [int(n) for n in args.clients.split(",") if n.strip()]
    if not args.clients or min(args.clients) < 1 or min(args.prompt_lens) < 1 or args.max_tokens < 1:
        parser.error("--clients, --prompt-lens and --max-tokens must be positive")
    if max(args.prompt_lens) + args.max_tokens > preset.config.max_seq_len:
        parser.error(f"the longest prompt + --max-tokens exceed the model's {preset.config.max_seq_len} tokens")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- the model -------------------------------------------------------------------------------------

def write_model(directory: Path, args: argparse.Namespace) -> dict:
    """A random-weight HF directory with a tokenizer whose vocabulary matches; returns what was written."""
    import torch

    preset = PRESETS[args.preset]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer
    if tokenizer is None and preset.llama2_tokenizer:
        if LLAMA2_TOKENIZER.is_file():
            tokenizer = LLAMA2_TOKENIZER
        else:
            log(f"warning: {LLAMA2_TOKENIZER} not found; training a 400-token tokenizer, so the classifier is "
                "smaller than Llama 2's and the numbers are not comparable with a 32000-token run")
    if tokenizer is None:
        tokenizer = train_tokenizer(directory.parent, preset.vocab if not preset.llama2_tokenizer else 400)
    from llamaforge.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer).vocab_size
    config = preset.config.replace(vocab_size=vocab)
    model = random_model(config, seed=args.seed)
    with torch.no_grad():  # EOS's logit is then always 0: greedy decoding never ends a request early
        model.lm_head.weight[config.eos_token_id] = 0.0
    write_hf_dir(directory, model, tokenizer)
    info = {"config": {k: v for k, v in asdict(config).items() if k != "extra"},
            "parameters": config.num_parameters(), "tokenizer": str(tokenizer), "vocab_size": vocab,
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "torch": torch.__version__}
    del model
    gc.collect()
    return info


def make_prompts(count: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """`count` token-id prompts, each BOS + random ids, with lengths cycling through `lengths`."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)] - 1)] for i in range(count)]


# --- the servers -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _prepare_server_process() -> None:
    """In the child before exec: SIGTERM it if this benchmark dies (even by SIGKILL), and schedule it normally.

    Run under `chrt -f`, this benchmark's children would inherit its real-time priority, under which a server's
    spinning compute threads (llama.cpp's and torch's OpenMP pools alike) keep both cores from the server's own
    HTTP thread until they run out of work: tokens then leave in bursts and new requests wait. No deployment
    runs a server that way, so the servers get the ordinary scheduler and only the clients keep the priority.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


class ServerProcess:
    """A server in its own process group (`python -m llamaforge serve`, or llama.cpp's `llama-server` when
    given a GGUF file and the binary); stop() ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, model: Path, max_batch_size: int, threads: int, log_path: Path,
                 llama_server: Path | None = None, context: int = 0) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if llama_server is None:
            self.command = [sys.executable, "-m", "llamaforge", "serve", "--model", str(model), "--port",
                            str(self.port), "--max-batch-size", str(max_batch_size)]
        else:  # one slot per sequence, each with the model's context, as llamaforge's engine allocates
            self.command = [str(llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                            "-t", str(threads), "-tb", str(threads), "-np", str(max_batch_size), "-c",
                            str(context * max_batch_size), "--cont-batching", "--no-webui"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log_file = log_path.open("wb")
        self.process = subprocess.Popen(self.command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_prepare_server_process)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {self.name} did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self.log_file.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log_file.close()


# --- CPU accounting ------------------------------------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; idle and iowait excluded, steal included)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS


def process_cpu_s(pid: int | str) -> float:
    """CPU seconds (user + system, all threads) of one process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class CpuMeter:
    """CPU used by the measured server, this process and everything else, between start() and stop()."""

    def __init__(self, servers: list[ServerProcess]) -> None:
        self.pids = [s.process.pid for s in servers]

    def read(self) -> tuple[float, list[float], float]:
        return machine_busy_s(), [process_cpu_s(pid) for pid in self.pids], process_cpu_s("self")

    def start(self) -> None:
        self.before = self.read()
        self.started = time.perf_counter()

    def stop(self) -> tuple[list[float], float, float]:
        """(cores used by each server, by this process, by everything else), averaged over the interval."""
        (machine0, servers0, me0), (machine1, servers1, me1) = self.before, self.read()
        wall = time.perf_counter() - self.started
        servers = [(b - a) / wall for a, b in zip(servers0, servers1, strict=True)]
        me = (me1 - me0) / wall
        return servers, me, max(0.0, (machine1 - machine0) / wall - sum(servers) - me)


def wait_for_quiet(meter: CpuMeter, threshold: float, patience: float) -> float:
    """Wait (at most `patience` s) until other processes use under `threshold` cores for 2 s; return their use."""
    if patience <= 0:
        return 0.0
    deadline = time.monotonic() + patience
    while True:
        meter.start()
        time.sleep(2.0)
        other = meter.stop()[2]
        if other < threshold or time.monotonic() > deadline:
            return other
        log(f"  the machine is busy ({other:.2f} cores used by other processes); waiting")


# --- the client ------------------------------------------------------------------------------------

async def engine_counters(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's engine gauges from /metrics (steps run, largest batch so far); none from llama.cpp's."""
    response = await client.get("/metrics")
    text = response.text if response.status_code == 200 else ""
    wanted = {"llamaforge_engine_steps": "steps", "llamaforge_peak_batch_size": "peak"}
    counters = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            counters[wanted[name]] = float(value)
    return counters


async def stream_one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, origin: float) -> RequestResult:
    """Send one streaming completion; time its first and last token chunks."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    result = RequestResult(prompt_tokens=len(prompt))
    result.sent = time.perf_counter() - origin
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            payload = json.loads(data)
            if "error" in payload:
                raise RuntimeError(f"in-band error: {payload['error']}")
            if payload.get("usage"):
                result.completion_tokens = payload["usage"]["completion_tokens"]
            for choice in payload.get("choices", []):
                now = time.perf_counter() - origin
                if result.first_token is None:
                    result.first_token = now
                result.last_token = now
                result.chunks += 1
                result.text += choice["text"]
                result.finish_reason = choice["finish_reason"] or result.finish_reason
    result.done = time.perf_counter() - origin
    if not result.completion_tokens:  # llama.cpp's stream reports no usage; it sends one token a chunk
        result.completion_tokens = result.chunks
    return result


async def run_level(server: ServerProcess, clients: int, prompts: list[list[int]], max_tokens: int,
                    meter: CpuMeter | None = None) -> LevelResult:
    """`clients` concurrent clients work through `prompts` (each takes the next when its last one ends)."""
    meter = meter or CpuMeter([server])
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(900.0), limits=limits) as client:
        todo = list(enumerate(prompts))[::-1]
        runs: list[tuple[int, RequestResult]] = []
        before = await engine_counters(client)
        meter.start()
        origin = time.perf_counter()

        async def worker() -> None:
            while todo:
                index, prompt = todo.pop()
                runs.append((index, await stream_one(client, prompt, max_tokens, origin)))

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - origin
        servers_cpu, client_cpu, other_cpu = meter.stop()
        after = await engine_counters(client)
    results = [r for _, r in sorted(runs, key=lambda pair: pair[0])]
    completion = sum(r.completion_tokens for r in results)
    steps = int(after["steps"] - before["steps"]) if "steps" in after else 0
    ttfts = [r.ttft for r in results]
    tpots = [r.tpot for r in results if r.tpot is not None]
    return LevelResult(
        server=server.name, clients=clients, requests=len(results), wall_s=wall,
        prompt_tokens=sum(r.prompt_tokens for r in results), completion_tokens=completion, engine_steps=steps,
        peak_batch=int(after.get("peak", 0)), tok_s=completion / wall, ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99), tpot_p50_ms=percentile(tpots, 50) * 1e3 if tpots else None,
        mean_batch=completion / steps if steps else None, server_cpu_cores=servers_cpu[0], client_cpu_cores=client_cpu,
        other_cpu_cores=other_cpu, runs=results,
    )


async def warm_up(server: ServerProcess, prompt_lens: list[int], vocab: int) -> None:
    """A few short requests, alone and together, so first-call allocations are not measured."""
    clients = min(server.max_batch_size, 4)
    prompts = make_prompts(clients * 2, prompt_lens, vocab, seed=12345)
    await run_level(server, 1, prompts[:1], 4)
    await run_level(server, clients, prompts, 4)


# --- the run ---------------------------------------------------------------------------------------

def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    log(f"writing a random-weight {args.preset} model to {workdir}")
    model = write_model(workdir / "model", args)
    log(f"{model['parameters'] / 1e6:.1f}M parameters, vocab {model['vocab_size']} ({model['tokenizer']})")
    servers: list[ServerProcess] = []
    try:
        ours = workdir / "model"
        if args.weights != "f32" or args.llama_server:
            gguf_file = export_gguf(workdir / "model", workdir / f"model-{args.weights}.gguf", args.weights)
            ours = gguf_file if args.weights != "f32" else ours
        for name, batch in (("a", args.batch_size), ("b", 1)):
            servers.append(ServerProcess(name, ours, batch, args.threads, workdir / f"server-{name}.log"))
        if args.llama_server:
            servers.append(ServerProcess("c", gguf_file, args.batch_size, args.threads, workdir / "server-c.log",
                                         args.llama_server, PRESETS[args.preset].config.max_seq_len))
        else:
            log(f"(c) llama.cpp server: skipped: {LLAMA_CPP_SKIPPED}")
        for server in servers:
            server.wait_ready()
            log(f"server ({server.name}) with {server.max_batch_size} slots ready at {server.url}; warming up")
            asyncio.run(warm_up(server, args.prompt_lens, model["vocab_size"]))
        results = []
        for clients in args.clients:
            count = max(clients * args.rounds, args.min_requests)
            prompts = make_prompts(count, args.prompt_lens, model["vocab_size"], seed=args.seed + clients)
            for server in servers:
                meter = CpuMeter([server] + [s for s in servers if s is not server])
                log(f"{clients} clients, {count} requests: server ({server.name})")
                wait_for_quiet(meter, args.quiet_below, args.quiet_wait)
                level = asyncio.run(run_level(server, clients, prompts, args.max_tokens, meter))
                log(f"  {level.tok_s:.1f} tok/s, TTFT p50 {level.ttft_p50_s:.2f} s, p99 {level.ttft_p99_s:.2f} s, "
                    f"{level.completion_tokens} tokens in {level.wall_s:.1f} s; cores used: server "
                    f"{level.server_cpu_cores:.2f}, clients {level.client_cpu_cores:.2f}, other processes "
                    f"{level.other_cpu_cores:.2f}")
                results.append(level)
    finally:
        for server in servers:
            server.stop()
    return report(args, model, results)


def export_gguf(model_dir: Path, path: Path, weights: str) -> Path:
    """The benchmark's model as a GGUF of `weights` (f32, q8_0, q4_0), written by `llamaforge export`."""
    done = subprocess.run([sys.executable, "-m", "llamaforge", "export", "--model", str(model_dir), "--out", str(path),
                           "--type", weights], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llamaforge export failed: {done.stderr}")
    return path


def report(args: argparse.Namespace, model: dict, results: list[LevelResult]) -> dict:
    """JSON-ready: the setup, every level of every server, the ratios of (a) to the others, llama.cpp's skip."""
    by_key = {(r.server, r.clients): r for r in results}
    ratios = []
    for clients in args.clients:
        a = by_key[("a", clients)]
        for other in ("b", "c"):
            if (other, clients) not in by_key:
                continue
            b = by_key[(other, clients)]
            same = sum(x.text == y.text for x, y in zip(a.runs, b.runs, strict=True))
            ratios.append({"clients": clients, "versus": other, "tok_s_ratio": a.tok_s / b.tok_s, "same_text": same,
                           "requests": a.requests})
    levels = []
    for r in results:
        level = asdict(r)
        level["runs"] = [{k: v for k, v in asdict(run).items() if k != "text"} | {"ttft": run.ttft, "tpot": run.tpot}
                         for run in r.runs]
        levels.append(level)
    return {
        "setup": {"preset": args.preset, **model, "max_tokens": args.max_tokens, "prompt_lens": args.prompt_lens,
                  "rounds": args.rounds, "min_requests": args.min_requests, "threads": args.threads,
                  "batch_size": args.batch_size, "quiet_below": args.quiet_below, "quiet_wait": args.quiet_wait,
                  "weights": args.weights,
                  "python": sys.version.split()[0], "cpu_count": os.cpu_count()},
        "results": levels,
        "ratios": ratios,
        "llama_cpp": ({"skipped": False, "binary": str(args.llama_server)} if args.llama_server
                      else {"skipped": True, "reason": LLAMA_CPP_SKIPPED}),
    }


def format_table(report: dict) -> str:
    """The results as a Markdown table: every server at each level, and (a)'s throughput over the others'."""
    setup = report["setup"]
    config = setup["config"]
    lines = [
        f"preset {setup['preset']} ({setup['parameters'] / 1e6:.1f}M parameters: dim {config['dim']}, "
        f"{config['n_layers']} layers, vocab {setup['vocab_size']}; {setup.get('weights', 'f32')} weights), "
        f"{setup['threads']} threads per "
        f"server; streaming /v1/completions, temperature 0, max_tokens {setup['max_tokens']}, prompts of "
        f"{'/'.join(map(str, setup['prompt_lens']))} tokens; torch {setup['torch']}",
        "",
        "| clients | requests | server | output tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | mean batch "
        "| tokens | other load (cores) | (a) / this |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {(r["clients"], r["versus"]): r for r in report["ratios"]}
    names = {"a": f"(a) batching, max batch {setup['batch_size']}", "b": "(b) one at a time",
             "c": f"(c) llama.cpp server, {setup['batch_size']} slots"}
    for level in report["results"]:
        ratio = ratios.get((level["clients"], level["server"]))
        versus = f"{ratio['tok_s_ratio']:.2f}" if ratio else ""
        tpot = f"{level['tpot_p50_ms']:.1f}" if level["tpot_p50_ms"] is not None else "-"
        batch = f"{level['mean_batch']:.1f}" if level["mean_batch"] is not None else "-"
        lines.append(f"| {level['clients']} | {level['requests']} | {names[level['server']]} | {level['tok_s']:.1f} "
                     f"| {level['ttft_p50_s']:.2f} | {level['ttft_p99_s']:.2f} | {tpot} | {batch} "
                     f"| {level['completion_tokens']} | {level['other_cpu_cores']:.2f} | {versus} |")
    if report["llama_cpp"]["skipped"]:
        lines.append("| | | (c) llama.cpp server | skipped | | | | | | | |")
    lines += ["", "identical greedy text as (a): " + ", ".join(
        f"({r['versus']}) {r['clients']} clients {r['same_text']}/{r['requests']}" for r in report["ratios"])]
    if report["llama_cpp"]["skipped"]:
        lines.append(f"(c) llama.cpp server: skipped: {report['llama_cpp']['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # A SIGTERM to the benchmark unwinds like Ctrl-C does, so the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="llamaforge-serve-bench-") as workdir:
        report_ = benchmark(args, Path(workdir))
    print(json.dumps(report_, indent=2) if args.json else format_table(report_))


if __name__ == "__main__":
    main()
