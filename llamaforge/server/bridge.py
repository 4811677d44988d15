"""From the engine's worker thread to asyncio: one request's token events as an async iterator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from llamaforge.engine import Engine, EngineRequest
from llamaforge.generate import TokenEvent
from llamaforge.sampling import SamplingParams
from llamaforge.server.metrics import Metrics


class RequestStream:
    """Submit a request on creation; iterate its TokenEvents; cancel it if the consumer stops early."""

    def __init__(self, engine: Engine, metrics: Metrics, prompt_ids: list[int], params: SamplingParams,
                 prompt_as_context: bool) -> None:
        self.engine = engine
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.request = EngineRequest(prompt_ids, params, self._emit, prompt_as_context)
        self.finished = False
        self.generated = 0
        engine.submit(self.request)  # QueueFullError propagates to the route: 503

    def _emit(self, item: TokenEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def events(self) -> AsyncIterator[TokenEvent]:
        last = self.request.submitted_at
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                now = time.perf_counter()
                histogram = self.metrics.inter_token_latency if self.generated else self.metrics.time_to_first_token
                histogram.observe(now - last)
                last = now
                self.generated += 1
                self.finished = item.finish_reason is not None
                yield item
                if self.finished:
                    self.metrics.prompt_tokens.inc(len(self.request.prompt_ids))
                    self.metrics.generated_tokens.inc(self.generated)
                    return
        finally:
            if not self.finished:  # the client went away or the consumer stopped: free the slot
                self.engine.cancel(self.request)
