"""What the routes share: the model, the engine, the metrics; and the error bodies of both protocols."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from llamaforge.api import LLM
from llamaforge.engine import Engine
from llamaforge.server.metrics import Metrics


@dataclass
class ServerState:
    llm: LLM
    engine: Engine
    metrics: Metrics
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def event_stream(lines: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, already formatted as `data: ...` lines, uncached."""
    return StreamingResponse(lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def openai_error_body(error: BaseException | str, kind: str = "invalid_request_error",
                      param: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": str(error), "type": kind, "param": param, "code": None}}


def tgi_error_body(error: BaseException | str, kind: str = "validation") -> dict:
    """TGI's error object: {"error": message, "error_type": kind}."""
    return {"error": str(error), "error_type": kind}
