"""The HTTP server: OpenAI- and TGI-compatible routes, Prometheus metrics, the web playground."""

from __future__ import annotations

from llamaforge.api import LLM
from llamaforge.engine import Engine
from llamaforge.server.app import create_app

__all__ = ["create_app", "serve"]


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
          max_context: int | None = None, api_key: str | None = None, max_queue: int = 256) -> None:
    """Run the server until interrupted (uvicorn, one process; the engine thread owns the model)."""
    import uvicorn

    engine = Engine(llm, max_batch_size=max_batch_size, max_context=max_context, max_queue=max_queue)
    print(f"llamaforge: KV cache of {engine.max_batch_size} slots x {engine.max_context} tokens: "
          f"{engine.kv_cache_bytes / 2**30:.2f} GiB", flush=True)
    app = create_app(llm, engine, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
