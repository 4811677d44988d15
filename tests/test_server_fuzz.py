"""Schemathesis against the server's OpenAPI schema: whatever a client sends, never a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

pytestmark = pytest.mark.slow
OPERATIONS = ["POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /generate",
              "POST /generate_stream", "POST /", "GET /info", "GET /health", "POST /tokenize"]


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
