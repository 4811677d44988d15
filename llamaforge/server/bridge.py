"""From the engine's worker thread to asyncio: one request's token events as an async iterator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from llamaforge.engine import Engine, EngineRequest
from llamaforge.generate import TokenEvent
from llamaforge.sampling import SamplingParams
from llamaforge.server.metrics import Metrics
from llamaforge.structured import Constraint


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


class RequestStream:
    """One request in the engine: iterate its TokenEvents; it is cancelled if the consumer stops early."""

    def __init__(self, engine: Engine, metrics: Metrics, prompt_ids: list[int], params: SamplingParams,
                 prompt_as_context: bool, prompt_logprobs: int | None = None,
                 constraint: Constraint | None = None, adapter: int = 0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.request = EngineRequest(prompt_ids, params, self._emit, prompt_as_context, prompt_logprobs=prompt_logprobs,
                                     constraint=constraint, adapter=adapter)
        self.finished = False
        self.generated = 0

    @classmethod
    async def open(cls, engine: Engine, metrics: Metrics, prompt_ids: list[int], params: SamplingParams,
                   prompt_as_context: bool, prompt_logprobs: int | None = None,
                   constraint: Constraint | None = None, adapter: int = 0) -> RequestStream:
        """Submit a request (off the event loop: building its state costs as much as its stop strings are long).

        QueueFullError and the request's own errors propagate to the route (503, 400/422).
        """
        stream = cls(engine, metrics, prompt_ids, params, prompt_as_context, prompt_logprobs, constraint, adapter)
        await run_in_threadpool(engine.submit, stream.request)
        return stream

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
            self.close()

    def close(self) -> None:
        """Cancel the request unless it finished: the client went away or the consumer stopped."""
        if not self.finished:
            self.engine.cancel(self.request)

    async def collect(self, client: Request) -> list[TokenEvent]:
        """Every event of a whole (non-streaming) answer; ClientGone, and the request cancelled, if the client
        hangs up first. A stream notices a hang-up when it writes; a client waiting for one answer must be watched."""
        watcher = asyncio.create_task(_disconnected(client))
        watcher.add_done_callback(lambda task: task.cancelled() or self.queue.put_nowait(ClientGone()))
        try:
            return [event async for event in self.events()]
        finally:
            watcher.cancel()


async def open_streams(server, requests: list[tuple[list[int], SamplingParams]], prompt_as_context: bool,
                       grammar: str | None = None, grammar_source: str = "grammar", prompt_logprobs: int | None = None,
                       adapter: int = 0) -> list[RequestStream]:
    """Submit every (prompt ids, params) to the server's engine, each held to `grammar` if given (a Constraint of its
    own); if one is refused, cancel those already submitted and raise."""
    streams = []
    try:
        for ids, params in requests:
            constraint = None if grammar is None else \
                await run_in_threadpool(Constraint, server.llm.tokenizer, grammar, grammar_source)
            streams.append(await RequestStream.open(server.engine, server.metrics, ids, params, prompt_as_context,
                                                    prompt_logprobs, constraint, adapter))
    except BaseException:
        for opened in streams:
            opened.close()
        raise
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """The events of several streams (the n choices of one request) as they come, each with its stream's index;
    each stream's own events stay in order. A stream's error ends them all (the others are cancelled)."""
    iterators = [stream.events() for stream in streams]
    pending = {asyncio.ensure_future(anext(iterator)): index for index, iterator in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[index]))] = index
                yield index, event
    finally:
        for task in pending:
            task.cancel()
        for stream in streams:
            stream.close()


async def _disconnected(client: Request) -> None:
    """Return once the client has closed its connection (the body was read already: nothing else arrives)."""
    while (await client.receive())["type"] != "http.disconnect":
        pass
