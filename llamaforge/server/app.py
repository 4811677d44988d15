"""The FastAPI app: OpenAI and TGI routes over one engine, errors in each protocol's shape, auth, metrics.

The HTTP layer only translates protocols; the model runs on the engine's worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match

from llamaforge.api import LLM
from llamaforge.engine import Engine, EngineStoppedError, QueueFullError
from llamaforge.errors import LlamaforgeError
from llamaforge.server import openai_routes, tgi_routes
from llamaforge.server.bridge import ClientGone
from llamaforge.server.metrics import Metrics
from llamaforge.server.state import ModelNotFound, ServerState, openai_error_body, tgi_error_body

STATIC = Path(str(resources.files("llamaforge.server") / "static"))
RETRY_AFTER_SECONDS = "1"
ENGINE_STOP_SECONDS = 10.0  # how long shutdown waits for the engine's current step
logger = logging.getLogger("llamaforge.server")


class Gate:
    """ASGI middleware in front of every route: host check, API key, bounded body, metrics, security headers.

    In order: a Host header outside `allowed_hosts` is refused (DNS rebinding must not reach a server
    bound to loopback); without the API key only the playground and /health (GET) are open; the body is
    read here, within `max_bytes` and `body_timeout` seconds, and replayed to the route (an error raised
    inside FastAPI's body parsing would be a plain 400, not a 413 in the protocol's shape); every answer
    is counted by route template, never by raw path, so /metrics stays bounded whatever clients ask for.
    """

    def __init__(self, app, routes: Sequence[BaseRoute], server: ServerState, metrics: Metrics, max_bytes: int,
                 body_timeout: float, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.routes = routes
        self.server = server
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = _route_template(self.routes, scope)  # before routing, which rewrites the scope's paths
        status = CLIENT_CLOSED_REQUEST  # until a response starts: a client that leaves first gets none

        async def send_with_headers(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        try:
            refusal = self._refusal(Request(scope))
            if refusal is not None:
                return await refusal(scope, receive, send_with_headers)
            body = await self._read_body(scope, receive)
            if isinstance(body, Response):
                return await body(scope, receive, send_with_headers)
            if body is not None:
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:
            pass  # the client left before its body arrived: nobody to answer
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()

    def _refusal(self, request: Request) -> Response | None:
        """The answer to a request refused before its body is read (wrong host or key), if it is refused."""
        host = request.headers.get("host", "")
        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            return _error(request, 400, f"the Host header {host!r} is not one this server answers to; "
                                        "start it with --allowed-hosts to add a name")
        public = request.method in ("GET", "HEAD") and (
            request.url.path in ("/", "/health") or request.url.path.startswith("/static/"))
        if self.server.api_key and not public and not _has_key(request, self.server.api_key):
            return _error(request, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                          headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(self, scope, receive) -> bytes | Response | None:
        """The whole body (None for methods without one), or the error answering a body too large or too slow."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        request = Request(scope)
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return _error(request, 413, f"the request body is larger than {self.max_bytes} bytes")
        chunks, size, more = [], 0, True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                return _error(request, 408, f"the request body did not arrive within {self.body_timeout:g} s")
            if message["type"] != "http.request":
                raise ClientDisconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return _error(request, 413, f"the request body is larger than {self.max_bytes} bytes")
            more = message.get("more_body", False)
        return b"".join(chunks)


# Asked of every answer: no framing (clickjacking), no content sniffing; the playground's own files only.
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"referrer-policy", b"no-referrer"),
]
CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client that hung up before its answer


def _replay(body: bytes, receive):
    """A `receive` that gives the body once, then what the client sends next (its disconnect)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _route_template(routes: Sequence[BaseRoute], scope) -> str:
    """The route a request's path matches (its path template), or "unmatched": a bounded set of metric labels.

    Matched here, not read from the scope, so requests refused before routing are labelled too."""
    for route in routes:
        if route.matches(scope)[0] != Match.NONE:
            return route.path
    return "unmatched"


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "[::1]"."""
    host = host.lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _has_key(request: Request, api_key: str) -> bool:
    """Whether the request carries 'Authorization: Bearer <key>' (the scheme in any case, RFC 7235)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the Host names a server bound to loopback answers to


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


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    """One line naming the field and the problem, from pydantic's errors.

    A value that fits none of a union's types gets one error per type; the deepest one says most
    ("prompt.0: Input should be a valid integer", not "prompt: Input should be a valid string"), and
    the union's type tags are not field names, so they are left out.
    """
    if not errors:
        return "invalid request body", None
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    if error.get("type") == "json_invalid":  # its location is a character offset, not a field
        reason = (error.get("ctx") or {}).get("error", "JSON decode error")
        return f"the request body is not valid JSON ({reason} at character {error['loc'][-1]})", None
    if tuple(error.get("loc", ())) == ("body",) and error.get("type") == "missing":
        return "the request body is empty; send a JSON object", None
    if tuple(error.get("loc", ())) == ("body",) and error.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    location = [str(part) for part in error.get("loc", ()) if part != "body" and not _is_type_tag(part)]
    field = ".".join(location) or None
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{field}: {message}" if field else message), field


def _is_type_tag(part) -> bool:
    """Whether a pydantic location part names a union member ('str', 'list[int]', 'function-after[...]')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or "[" in part)


def create_app(llm: LLM, engine: Engine, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = 1 << 20, body_timeout: float = 30.0,
               allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """An app serving `llm` through `engine` (started and stopped with the app).

    `allowed_hosts` None answers any Host header; a server bound to loopback should pass LOOPBACK_HOSTS.
    """
    if llm.tokenizer is None:
        raise LlamaforgeError("the server needs a model with a tokenizer; pass --tokenizer")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine.thread is None:
            engine.start()
        yield
        engine.stop(timeout=ENGINE_STOP_SECONDS)

    app = FastAPI(title="llamaforge", version=__import__("llamaforge").__version__, lifespan=lifespan)
    metrics = Metrics(engine)
    name = model_name or Path(str(llm.source).rstrip("/")).name or "llamaforge"
    server = app.state.server = ServerState(llm, engine, metrics, name, api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _describe(list(exc.errors()))
        return _error(request, 400 if _is_openai(request) else 422, message, field)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return _error(request, 503, exc, headers={"Retry-After": RETRY_AFTER_SECONDS})

    @app.exception_handler(EngineStoppedError)
    async def engine_stopped(request: Request, exc: EngineStoppedError) -> JSONResponse:
        return _error(request, 503, exc)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; it is counted in /metrics

    @app.exception_handler(ModelNotFound)
    async def model_not_found(request: Request, exc: ModelNotFound) -> JSONResponse:
        if _is_openai(request):
            return JSONResponse(openai_error_body(exc, param="model", code="model_not_found"), status_code=404)
        return _error(request, 404, exc)

    @app.exception_handler(LlamaforgeError)
    async def user_error(request: Request, exc: LlamaforgeError) -> JSONResponse:
        return _error(request, 400 if _is_openai(request) else 422, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, exc.detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error answering %s %s", request.method, request.url.path)
        return _error(request, 500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.include_router(openai_routes.router)
    app.include_router(tgi_routes.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # The routes a request can match, for metric labels (FastAPI keeps included routers as one entry each).
    routes = [r for r in app.router.routes if hasattr(r, "path")] + openai_routes.router.routes + \
        tgi_routes.router.routes
    app.add_middleware(Gate, routes=routes, server=server, metrics=metrics, max_bytes=max_body_bytes,
                       body_timeout=body_timeout, allowed_hosts=allowed_hosts)
    return app
