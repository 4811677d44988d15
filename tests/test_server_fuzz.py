"""Schemathesis against the server's OpenAPI schema: whatever a client sends, never a 5xx."""

from __future__ import annotations

import pytest
from factories import wait_for

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

pytestmark = pytest.mark.slow
OPERATIONS = ["POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /generate",
              "POST /generate_stream", "POST /", "GET /info", "GET /health", "POST /tokenize",
              "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter"]


@pytest.fixture(scope="module")
def api_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")


@pytest.mark.parametrize("operation", OPERATIONS)
def test_no_server_errors(api_schema, operation: str) -> None:
    # Driven through Hypothesis directly: schemathesis' pytest plugin does not run under pytest 9 yet.
    method, path = operation.split()
    strategy = api_schema[path][method].as_strategy()

    @given(case=strategy)
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        response = case.call(timeout=60)
        assert response.status_code < 500, f"{operation} -> {response.status_code}: {response.text[:300]}"

    check()


def test_every_route_is_fuzzed(api_schema) -> None:
    assert sorted(result.ok().label for result in api_schema.get_all_operations()) == sorted(OPERATIONS)


# --- every field of every body, set to what a careless or hostile client sends ------------------------------

HOSTILE_VALUES = [1 << 64, -(1 << 64), 1 << 1000, 1e308, -0.0, 0, -1, "\ud800", "a\udfffb", "", "yes", True, False,
                  None, [], {}, [1, "a", None], [True, False], {"a": {"b": [1 << 64]}}, "x" * 10_000]
VALID_BODIES = {
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                             "temperature": 0.5, "top_p": 0.9, "n": 1, "stop": ["zz"], "seed": 1, "stream": False,
                             "stream_options": {"include_usage": True}, "max_completion_tokens": 4,
                             "logprobs": True, "top_logprobs": 2, "presence_penalty": 0, "frequency_penalty": 0},
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9,
                        "stop": "zz", "seed": 1, "stream": True, "logprobs": 2, "echo": True},
    "/generate": {"inputs": "hi", "stream": False, "parameters": {
        "max_new_tokens": 4, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.1,
        "stop": ["zz"], "seed": 1, "do_sample": True, "details": True, "return_full_text": True, "truncate": 8}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 4, "best_of": 1, "watermark": False,
                                                         "decoder_input_details": False, "top_n_tokens": None}},
    "/": {"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 4, "grammar": None, "adapter_id": None}},
    "/tokenize": {"inputs": "hi", "add_special_tokens": True},
    "/v1/load_lora_adapter": {"lora_name": "x", "lora_path": "/no/such/adapter"},
    "/v1/unload_lora_adapter": {"lora_name": "x"},
}
# This server serves no adapters: its answer to a well-formed adapter request is a 400 saying so.
VALID_STATUS = {"/v1/load_lora_adapter": 400, "/v1/unload_lora_adapter": 400}


def _field_paths(body, prefix=()) -> list[tuple]:
    """Every place in a body a value sits: ("messages", 0, "content"), ("parameters", "seed"), ..."""
    paths = []
    items = body.items() if isinstance(body, dict) else enumerate(body) if isinstance(body, list) else []
    for key, value in items:
        paths.append((*prefix, key))
        paths.extend(_field_paths(value, (*prefix, key)))
    return paths


def _with(body, path: tuple, value):
    import copy

    changed = copy.deepcopy(body)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


@pytest.mark.parametrize("route", list(VALID_BODIES))
def test_every_field_set_to_hostile_values_never_errs_on_the_server(live_server, route: str) -> None:
    import json

    import httpx

    valid = VALID_BODIES[route]
    cases = [_with(valid, path, value) for path in _field_paths(valid) for value in HOSTILE_VALUES]
    raw = [json.dumps(case).encode() for case in cases]  # lone surrogates travel as JSON's "\ud800" escapes
    raw += [b'{"inputs": "hi", "parameters": {"temperature": 1e999}, "prompt": "hi", "messages": 1e999}',
            b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe not utf-8", b"", b"null", b'"\\ud800"']
    expected = VALID_STATUS.get(route, 200)
    with httpx.Client(timeout=60) as http:
        assert http.post(f"{live_server.url}{route}", json=valid).status_code == expected
        for body in raw:
            response = http.post(f"{live_server.url}{route}", content=body,
                                 headers={"content-type": "application/json"})
            assert response.status_code < 500, f"{body[:200]!r} -> {response.status_code}: {response.text[:200]}"
            if response.status_code >= 400:
                assert "Traceback" not in response.text and response.json()["error"]
        assert http.post(f"{live_server.url}{route}", json=valid).status_code == expected
    engine = live_server.engine
    assert engine.health() is None
    # The last answer's slot is freed just after its last token went out.
    assert wait_for(lambda: engine.stats().free_slots == engine.max_batch_size)
