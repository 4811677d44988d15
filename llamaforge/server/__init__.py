"""The HTTP server: OpenAI- and TGI-compatible routes, Prometheus metrics, the web playground."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from llamaforge.api import LLM
from llamaforge.engine import Engine
from llamaforge.server.app import LOOPBACK_HOSTS, create_app

__all__ = ["create_app", "serve"]


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
          max_context: int | None = None, api_key: str | None = None, max_queue: int = 256,
          allowed_hosts: Sequence[str] | None = None, shutdown_timeout: float = 30.0,
          prefix_cache: bool = True, kv_cache_tokens: int | None = None) -> None:
    """Run the server until interrupted (uvicorn, one process; the engine thread owns the model).

    Bound to loopback, it answers only loopback Host names unless `allowed_hosts` says otherwise ("*":
    any); on SIGTERM or Ctrl-C, answers still running get `shutdown_timeout` seconds to finish. `prefix_cache` and
    `kv_cache_tokens`: see llamaforge.engine.
    """
    import uvicorn

    engine = Engine(llm, max_batch_size=max_batch_size, max_context=max_context, max_queue=max_queue,
                    prefix_cache=prefix_cache, kv_cache_tokens=kv_cache_tokens)
    pool = engine.blocks
    print(f"llamaforge: KV cache of {pool.usable * pool.block_len} tokens ({pool.usable} blocks of {pool.block_len}, "
          f"{engine.kv_cache_bytes / 2**30:.2f} GiB) for up to {engine.max_batch_size} sequences of up to "
          f"{engine.max_context} tokens", flush=True)
    app = create_app(llm, engine, api_key=api_key, allowed_hosts=default_allowed_hosts(host, allowed_hosts))
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_timeout)


def default_allowed_hosts(host: str, allowed_hosts: Sequence[str] | None) -> list[str] | None:
    """The Host names to answer: those given ("*" for any), else loopback names when bound to loopback."""
    if allowed_hosts is not None:
        return None if "*" in allowed_hosts else list(allowed_hosts)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return list(LOOPBACK_HOSTS) if loopback else None
