"""Hostile and careless clients: each gets its 4xx, and the requests beside it finish as if they were alone."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import threading
import time

import pytest
from factories import wait_for

httpx = pytest.importorskip("httpx")

HUGE = 1 << 64  # past every 64-bit integer a seed or top-k could be held in
USER = [{"role": "user", "content": "hi"}]
INNOCENT_PROMPTS = [f"Innocent request {i}: llamas" for i in range(6)]


async def _innocent(http: httpx.AsyncClient, url: str, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
    text = ""
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                payload = json.loads(line[6:])
                assert "error" not in payload, payload
                text += payload["choices"][0]["text"]
    return text


def alongside_innocents(server, hostile) -> list[httpx.Response]:
    """Run `hostile(http)` (a coroutine function returning responses) while six innocent streams run.

    Asserts that every innocent stream got exactly the text it gets alone and that no slot leaked."""
    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            innocents = [asyncio.create_task(_innocent(http, server.url, p)) for p in INNOCENT_PROMPTS]
            await asyncio.sleep(0.05)  # the innocents are running when the hostile request arrives
            hostile_responses = await hostile(http)
            texts = await asyncio.gather(*innocents)
            return hostile_responses, texts

    responses, texts = asyncio.run(run())
    expected = [server.llm.generate(p, max_new_tokens=24, temperature=0).text for p in INNOCENT_PROMPTS]
    assert texts == expected
    engine = server.engine
    assert wait_for(lambda: engine.stats().free_slots == engine.max_batch_size and not engine.stats().waiting)
    assert httpx.get(f"{server.url}/health").status_code == 200
    return responses


@pytest.fixture(scope="module")
def server(live_server, tiny_llm):
    live_server.llm = tiny_llm
    return live_server


def _raw(http: httpx.AsyncClient, url: str, path: str, body: str):
    return http.post(f"{url}{path}", content=body.encode(), headers={"content-type": "application/json"})


# Each: (route, JSON body as text — raw, so it can hold lone surrogates and numbers past float —, status, message).
HOSTILE = [
    ("/v1/chat/completions", json.dumps({"messages": USER, "max_tokens": 4, "seed": HUGE}), 400, r"seed: .*less than"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "seed": -(1 << 63) - 1}), 400, r"seed: .*greater than"),
    ("/v1/completions", json.dumps({"prompt": "x", "seed": HUGE, "stream": True}), 400, "seed"),
    ("/generate", json.dumps({"inputs": "x", "parameters": {"seed": HUGE}}), 422, "parameters.seed"),
    ("/generate", json.dumps({"inputs": "x", "parameters": {"do_sample": True, "top_k": HUGE}}), 422,
     "parameters.top_k"),
    ("/generate_stream", json.dumps({"inputs": "x", "parameters": {"top_k": HUGE}}), 422, "parameters.top_k"),
    ("/", json.dumps({"inputs": "x", "parameters": {"max_new_tokens": HUGE}}), 422, "parameters.max_new_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "max_tokens": HUGE}), 400, "max_tokens"),
    ("/generate", '{"inputs": "x", "parameters": {"temperature": 1e999}}', 422, "parameters.temperature"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "stream": "yes"}), 400, "stream: Input should be a valid "
                                                                                   "boolean"),
    ("/v1/completions", json.dumps({"prompt": [True, False]}), 400, r"prompt\.0: Input should be a valid integer"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400,
     r"messages\.0\.content: .*lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}], "stream": true}', 400,
     "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     400, "lone surrogate"),
    ("/v1/completions", '{"prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}', 400, "model"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}', 400, "stop"),
    ("/generate", '{"inputs": "\\ud800"}', 422, "inputs"),
    ("/tokenize", '{"inputs": "ab\\ud800"}', 422, "inputs"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), HOSTILE)
def test_a_hostile_value_gets_its_4xx_and_harms_nobody(server, path: str, body: str, status: int,
                                                       message: str) -> None:
    async def hostile(http):
        return [await _raw(http, server.url, path, body) for _ in range(3)]

    for response in alongside_innocents(server, hostile):
        assert response.status_code == status, response.text
        error = response.json()["error"]
        text = error["message"] if isinstance(error, dict) else error
        assert re.search(message, text), text
        assert "Traceback" not in response.text and "pybind" not in response.text


def test_four_stop_strings_of_250k_characters_harm_nobody(server) -> None:
    stops = ["a" * 249_990 + tail for tail in "bcde"]

    async def hostile(http):
        body = {"model": "tiny", "prompt": "x", "max_tokens": 20, "temperature": 0, "stop": stops}
        return [await http.post(f"{server.url}/v1/completions", json=body) for _ in range(4)]

    for response in alongside_innocents(server, hostile):
        assert response.status_code == 200, response.text[:300]
        assert response.json()["choices"][0]["text"] == server.llm.generate("x", max_new_tokens=20,
                                                                            temperature=0).text


def test_a_huge_top_k_inside_the_range_is_no_cut(server) -> None:
    async def hostile(http):
        body = {"inputs": "x", "parameters": {"top_k": (1 << 63) - 1, "seed": HUGE - 1, "max_new_tokens": 8}}
        return [await http.post(f"{server.url}/generate", json=body)]

    (response,) = alongside_innocents(server, hostile)
    assert response.status_code == 200
    expected = server.llm.generate("x", max_new_tokens=8, temperature=1.0, top_p=1.0, seed=HUGE - 1).text
    assert response.json()["generated_text"] == expected


# --- disconnects ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_server(tiny_tokenizer_path):
    """A model slow enough (~10 ms a token) that 3000 tokens cannot finish while a test watches."""
    from factories import LiveServer, random_model

    from llamaforge.api import LLM
    from llamaforge.config import ModelArgs
    from llamaforge.engine import Engine
    from llamaforge.server import create_app
    from llamaforge.tokenizer import Tokenizer

    config = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=400, hidden_dim=1024, max_seq_len=4096)
    llm = LLM(random_model(config, std=0.02), Tokenizer(tiny_tokenizer_path))
    engine = Engine(llm, max_batch_size=2)
    with LiveServer(create_app(llm, engine)) as live:
        live.engine = engine
        yield live


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": USER, "temperature": 0}),  # no max_tokens: the whole context
    ("/v1/completions", {"prompt": "x", "max_tokens": 3000, "temperature": 0}),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 3000}}),
    ("/", {"inputs": "x", "parameters": {"max_new_tokens": 3000}}),
])
def test_a_client_that_hangs_up_on_a_whole_answer_frees_its_slot(slow_server, path: str, body: dict) -> None:
    engine = slow_server.engine
    before = engine.stats().generated_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_server.url}{path}", json=body, timeout=httpx.Timeout(60, read=0.5))
    assert wait_for(lambda: engine.stats().free_slots == 2, timeout=5)
    assert engine.stats().generated_tokens - before < 600
    metrics = httpx.get(f"{slow_server.url}/metrics").text
    assert f'llamaforge_requests_total{{route="{path}",status="499"}}' in metrics


def _send_partial_body(url: str, declared: int, sent: bytes, path: str = "/v1/completions") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {declared}\r\n\r\n".encode() + sent)
    return connection


def _read_response(connection: socket.socket) -> str:
    """One whole HTTP response off a raw socket: its headers, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        body += connection.recv(65536)
    return (head + b"\r\n\r\n" + body).decode()


def test_a_client_that_hangs_up_mid_body_logs_no_error(server, caplog) -> None:
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)
    try:
        for _ in range(3):
            _send_partial_body(server.url, 200, b'{"prompt": "x", ').close()
        time.sleep(0.5)
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        uvicorn_logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_body_shorter_than_its_length_times_out_with_408(tiny_llm) -> None:
    from factories import LiveServer

    from llamaforge.engine import Engine
    from llamaforge.server import create_app

    with LiveServer(create_app(tiny_llm, Engine(tiny_llm, max_batch_size=1), body_timeout=0.5)) as live:
        connection = _send_partial_body(live.url, 200, b'{"prompt": "x"')
        connection.settimeout(10)
        answer = _read_response(connection)
        connection.close()
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert "did not arrive within 0.5 s" in answer


# --- the event loop stays free -------------------------------------------------------------------------

def test_tokenization_runs_off_the_event_loop(server, tiny_llm, monkeypatch) -> None:
    """While a /tokenize is in its tokenizer, /health still answers (it would wait for it on the loop)."""
    entered, release = threading.Event(), threading.Event()
    original = tiny_llm.tokenizer.encode_with_offsets

    def slow_encode(text):
        entered.set()
        release.wait(30)
        return original(text)

    monkeypatch.setattr(tiny_llm.tokenizer, "encode_with_offsets", slow_encode)
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        response=httpx.post(f"{server.url}/tokenize", json={"inputs": "Hello llamas"}, timeout=60)))
    worker.start()
    try:
        assert entered.wait(10)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    finally:
        release.set()
        worker.join(60)
    assert result["response"].status_code == 200


# --- metrics stay bounded -------------------------------------------------------------------------------

def test_metrics_are_labelled_by_route_template_not_raw_path(server) -> None:
    for i in range(200):
        httpx.get(f"{server.url}/no-such-page-{i}")
    text = httpx.get(f"{server.url}/metrics").text
    assert "no-such-page" not in text
    counted = re.search(r'llamaforge_requests_total\{route="unmatched",status="404"\} (\d+)', text)
    assert counted and float(counted.group(1)) >= 200
    assert httpx.get(f"{server.url}/static/nothing-{time.time()}.js").status_code == 404
    assert 'route="/static",status="404"' in httpx.get(f"{server.url}/metrics").text


# --- keys, hosts, headers -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(tiny_llm):
    from factories import LiveServer

    from llamaforge.engine import Engine
    from llamaforge.server import create_app
    from llamaforge.server.app import LOOPBACK_HOSTS

    app = create_app(tiny_llm, Engine(tiny_llm, max_batch_size=1), api_key="s3cret", allowed_hosts=LOOPBACK_HOSTS)
    with LiveServer(app) as live:
        yield live


def test_with_a_key_only_the_page_and_health_are_open(keyed_server) -> None:
    url = keyed_server.url
    assert httpx.get(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/static/app.js").status_code == 200
    tgi = {"inputs": "x", "parameters": {"max_new_tokens": 2}}
    for method, path in [("POST", "/"), ("POST", "/health"), ("POST", "/generate"), ("GET", "/metrics"),
                         ("GET", "/info"), ("POST", "/tokenize"), ("POST", "/static/app.js")]:
        response = httpx.request(method, f"{url}{path}", json=tgi)
        assert response.status_code == 401, (method, path, response.status_code)
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = httpx.post(f"{url}/", json=tgi, headers={"Authorization": f"{scheme} s3cret"})
        assert response.status_code == 200, (scheme, response.text)
    assert httpx.post(f"{url}/", json=tgi, headers={"Authorization": "Basic s3cret"}).status_code == 401


def test_a_foreign_host_header_is_refused(keyed_server) -> None:
    url = keyed_server.url
    port = url.rsplit(":", 1)[1]
    refused = httpx.get(f"{url}/", headers={"Host": "attacker.example"})
    assert refused.status_code == 400 and "attacker.example" in refused.json()["error"]
    refused = httpx.get(f"{url}/health", headers={"Host": f"attacker.example:{port}"})
    assert refused.status_code == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert httpx.get(f"{url}/health", headers={"Host": host}).status_code == 200, host


def test_default_allowed_hosts() -> None:
    from llamaforge.server import default_allowed_hosts

    assert "localhost" in default_allowed_hosts("127.0.0.1", None)
    assert "localhost" in default_allowed_hosts("::1", None)
    assert "localhost" in default_allowed_hosts("localhost", None)
    assert default_allowed_hosts("0.0.0.0", None) is None  # bound to every interface: any name reaches it
    assert default_allowed_hosts("127.0.0.1", ["*"]) is None
    assert default_allowed_hosts("0.0.0.0", ["llm.example"]) == ["llm.example"]


def test_answers_carry_security_headers(keyed_server) -> None:
    response = httpx.get(f"{keyed_server.url}/")
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_a_500_shows_no_internals(server, tiny_llm, monkeypatch) -> None:
    def broken(messages):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(tiny_llm, "chat_tokens", broken)
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER})
    assert response.status_code == 500
    assert "secret internal detail" not in response.text and "RuntimeError" in response.json()["error"]["message"]


@pytest.mark.slow
def test_serve_takes_its_key_from_a_file_and_answers_loopback_names_only(tmp_path) -> None:
    from factories import ServeCommand

    key_file = tmp_path / "api-key"
    key_file.write_text("from-a-file\n")
    with ServeCommand("--api-key-file", str(key_file), "--max-batch-size", "2") as served:
        assert httpx.get(f"{served.url}/v1/models").status_code == 401
        models = httpx.get(f"{served.url}/v1/models", headers={"Authorization": "Bearer from-a-file"})
        assert models.status_code == 200
        assert httpx.get(f"{served.url}/health", headers={"Host": "rebound.example"}).status_code == 400
        assert httpx.get(f"{served.url}/health", headers={"Host": f"localhost:{served.port}"}).status_code == 200


def test_an_empty_key_file_is_a_one_line_error(tmp_path) -> None:
    import subprocess
    import sys

    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = subprocess.run([sys.executable, "-m", "llamaforge", "serve", "--api-key-file", str(empty)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"the API key file {empty} is empty" in result.stderr


@pytest.mark.slow
def test_sigterm_stops_the_server_within_its_shutdown_timeout(tmp_path, tiny_tokenizer_path) -> None:
    """A long answer in flight does not keep the server up: after --shutdown-timeout it is cut, and it exits."""
    from factories import ServeCommand, random_model, write_hf_dir

    from llamaforge.config import ModelArgs

    config = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=400, hidden_dim=1024, max_seq_len=4096)
    model_dir = write_hf_dir(tmp_path / "slow", random_model(config, std=0.02), tiny_tokenizer_path)
    body = {"model": "m", "messages": USER, "max_tokens": 4000, "stream": True, "temperature": 0}
    with ServeCommand("--model", str(model_dir), "--shutdown-timeout", "1", "--max-batch-size", "1") as served:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            served.process.terminate()
            started = time.monotonic()
            served.process.wait(timeout=30)  # 4000 tokens at ~10 ms would take 40 s
            stopped_after = time.monotonic() - started
        log = served.process.stderr.read()
    # uvicorn ends by re-raising the signal it handled, as a process killed by SIGTERM would end.
    assert served.process.returncode == -signal.SIGTERM and "Application shutdown complete" in log, log
    assert "timeout graceful shutdown exceeded" in log and stopped_after < 20


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": USER, "stream": True, "max_tokens": 8}),
    ("/v1/completions", {"prompt": "x", "stream": True, "max_tokens": 8}),
    ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 8}}),
])
def test_a_stream_whose_client_left_before_it_started_is_cancelled(tiny_llm, path: str, body: dict) -> None:
    """The client is gone before the first byte: the event generator never runs, the request is cancelled anyway."""
    from llamaforge.engine import Engine
    from llamaforge.server import create_app

    engine = Engine(tiny_llm, max_batch_size=1)  # not started: the request stays in the queue, where we look
    app = create_app(tiny_llm, engine)
    messages = iter([{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}])

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    async def send(message):
        await asyncio.sleep(0)  # a real server's send yields to the loop: the disconnect cancels the response here

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    assert len(engine.waiting) == 1 and engine.waiting[0].cancelled
