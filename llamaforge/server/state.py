"""What the routes share: the model, the engine, the metrics; and the error bodies of both protocols."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
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


class EventStream(StreamingResponse):
    """Server-sent events, already formatted as `data: ...` lines, uncached; `on_close` runs however the
    response ends, also when the client left before it started (then the lines are never iterated)."""

    def __init__(self, lines: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def openai_error_body(error: BaseException | str, kind: str = "invalid_request_error",
                      param: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": str(error), "type": kind, "param": param, "code": None}}


def tgi_error_body(error: BaseException | str, kind: str = "validation") -> dict:
    """TGI's error object: {"error": message, "error_type": kind}."""
    return {"error": str(error), "error_type": kind}
