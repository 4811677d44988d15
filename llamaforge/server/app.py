"""The FastAPI app: OpenAI and TGI routes over one engine, errors in each protocol's shape, auth, metrics.

The HTTP layer only translates protocols; the model runs on the engine's worker thread.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaforge.api import LLM
from llamaforge.engine import Engine, QueueFullError
from llamaforge.errors import LlamaforgeError
from llamaforge.server import openai_routes, tgi_routes
from llamaforge.server.metrics import Metrics
from llamaforge.server.state import ServerState, openai_error_body, tgi_error_body

STATIC = Path(str(resources.files("llamaforge.server") / "static"))
RETRY_AFTER_SECONDS = "1"


class BodySizeLimit:
    """ASGI middleware: refuse a body past `max_bytes`, by its Content-Length or while it streams in.

    The body is read here, then replayed to the app: JSON bodies are small, and an error raised from
    inside FastAPI's body parsing would turn into a plain 400 instead of a 413 in the protocol's shape.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        request = Request(scope)
        too_large = _error(request, 413, f"the request body is larger than {self.max_bytes} bytes")
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnects, for streaming responses
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _error(request: Request, status: int, error: BaseException | str, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    """An error in the shape of the protocol the route belongs to."""
    if _is_openai(request):
        kind = {401: "authentication_error", 503: "server_overloaded"}.get(status, "invalid_request_error")
        if status >= 500 and status != 503:
            kind = "server_error"
        body = openai_error_body(error, kind, param)
    else:
        kind = {401: "authentication", 413: "validation", 503: "overloaded"}.get(status, "validation")
        body = tgi_error_body(error, "generation" if status >= 500 and status != 503 else kind)
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(error: dict) -> tuple[str, str | None]:
    """One line naming the field and the problem, from a pydantic error."""
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{field}: {message}" if field else message), field


def create_app(llm: LLM, engine: Engine, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """An app serving `llm` through `engine` (started and stopped with the app)."""
    if llm.tokenizer is None:
        raise LlamaforgeError("the server needs a model with a tokenizer; pass --tokenizer")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine.thread is None:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llamaforge", version=__import__("llamaforge").__version__, lifespan=lifespan)
    metrics = Metrics(engine)
    name = model_name or Path(str(llm.source).rstrip("/")).name or "llamaforge"
    app.state.server = ServerState(llm, engine, metrics, name, api_key)

    # Added first, so it sits inside the guard below, which then counts its 413s too.
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.middleware("http")
    async def guard(request: Request, call_next) -> Response:
        route = request.url.path
        response = await _guarded(request, call_next, app.state.server)
        if route.startswith("/static/"):
            route = "/static"
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _describe(exc.errors()[0]) if exc.errors() else ("invalid request body", None)
        return _error(request, 400 if _is_openai(request) else 422, message, field)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return _error(request, 503, exc, headers={"Retry-After": RETRY_AFTER_SECONDS})

    @app.exception_handler(LlamaforgeError)
    async def user_error(request: Request, exc: LlamaforgeError) -> JSONResponse:
        return _error(request, 400 if _is_openai(request) else 422, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, exc.detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        return _error(request, 500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.include_router(openai_routes.router)
    app.include_router(tgi_routes.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _guarded(request: Request, call_next, server: ServerState) -> Response:
    """Refuse missing or wrong API keys before a route runs."""
    path = request.url.path
    public = path == "/" or path == "/health" or path.startswith("/static/")
    if server.api_key and not public:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
            return _error(request, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                          headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)
