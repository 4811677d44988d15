"""What the routes share: the model, the engine, the metrics; and the error bodies of both protocols."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from llamaforge.api import LLM
from llamaforge.engine import Engine
from llamaforge.errors import LlamaforgeError
from llamaforge.server.metrics import Metrics


class ModelNotFound(LlamaforgeError):
    """A request named a model (or adapter) this server does not serve: OpenAI's 404 model_not_found."""


@dataclass
class ServerState:
    llm: LLM
    engine: Engine
    metrics: Metrics
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def adapter_slot(self, name: str | None, field_name: str = "model") -> int:
        """The engine's adapter slot for a requested model name: 0 for the base model. A server without adapters
        answers any name with its model (as llama.cpp's does); one with adapters must not run the wrong weights
        for a mistyped name, so it refuses names it does not serve."""
        adapters = self.llm.adapters
        if adapters is None or name is None or name == self.model_name:
            return 0
        if name in adapters.slots:
            return adapters.slots[name]
        served = ", ".join([self.model_name, *adapters.slots])
        raise ModelNotFound(f"{field_name} {name!r} is not served here; this server serves {served}")


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


# Line breaks to JSON's parsers but not to every SSE reader: httpx's `aiter_lines` and any client that splits
# decoded text with str.splitlines end a line at these too, and would cut an event holding one in half.
_UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(payload: dict, prefix: str = "data: ") -> str:
    """One server-sent event holding `payload` as JSON on a single line, whichever way the client splits lines."""
    return f"{prefix}{json.dumps(payload, ensure_ascii=False).translate(_UNICODE_LINE_BREAKS)}\n\n"


def openai_error_body(error: BaseException | str, kind: str = "invalid_request_error",
                      param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": str(error), "type": kind, "param": param, "code": code}}


def tgi_error_body(error: BaseException | str, kind: str = "validation") -> dict:
    """TGI's error object: {"error": message, "error_type": kind}."""
    return {"error": str(error), "error_type": kind}
