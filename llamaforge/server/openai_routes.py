"""OpenAI's /v1/chat/completions, /v1/completions and /v1/models, streaming as server-sent events."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from llamaforge.generate import TokenEvent
from llamaforge.sampling import SamplingParams
from llamaforge.server.bridge import RequestStream
from llamaforge.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from llamaforge.server.state import EventStream, ServerState, openai_error_body, sse_event

router = APIRouter()


def sse(payloads: AsyncIterator[dict], stream: RequestStream) -> StreamingResponse:
    """Server-sent events, one JSON object each, closed by OpenAI's `data: [DONE]`."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for payload in payloads:
                yield sse_event(payload)
        except Exception as exc:  # an error after the 200 went out: tell the client in-band
            yield sse_event(openai_error_body(exc))
        yield "data: [DONE]\n\n"

    return EventStream(lines(), on_close=stream.close)


def _params(server: ServerState, body: OpenAIRequest, prompt_ids: list[int], max_tokens: int | None,
            logprobs: bool, top_logprobs: int) -> SamplingParams:
    """Sampling parameters from the body; without max_tokens, the answer may fill the rest of the context."""
    room = max(1, server.engine.max_context - len(prompt_ids))
    return SamplingParams(max_new_tokens=max_tokens or room, temperature=body.temperature, top_p=body.top_p,
                          seed=body.seed, stop=tuple(body.stop), logprobs=logprobs, top_logprobs=top_logprobs)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(server: ServerState, token_id: int) -> tuple[str, list[int]]:
    raw = server.llm.tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _chat_logprobs(server: ServerState, event: TokenEvent, first: bool) -> dict:
    """One content token's log-probs; the first token loses its word-start space, as the answer's text does
    (Meta's decode drops it), so the tokens add up to the content."""
    text, raw = _token_text(server, event.token_id)
    if first and text.startswith(" "):
        text, raw = text[1:], raw[1:]
    top = []
    for token_id, logprob in (event.top_logprobs or {}).items():
        top_text, top_raw = _token_text(server, token_id)
        top.append({"token": top_text, "logprob": logprob, "bytes": top_raw})
    return {"token": text, "logprob": event.logprob, "bytes": raw, "top_logprobs": top}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    server: ServerState = request.app.state.server
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                       "owned_by": "llamaforge"}]}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict | StreamingResponse:
    server: ServerState = request.app.state.server
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = await run_in_threadpool(server.llm.chat_tokens, messages)
    params = _params(server, body, prompt_ids, body.max_completion_tokens or body.max_tokens, body.logprobs,
                     body.top_logprobs or 0)
    stream = await RequestStream.open(server.engine, server.metrics, prompt_ids, params, prompt_as_context=False)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model = body.model or server.model_name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            payload["usage"] = None
        return payload

    if body.stream:
        async def chunks() -> AsyncIterator[dict]:
            yield chunk({"role": "assistant", "content": ""})
            async for event in stream.events():
                logprobs = {"content": [_chat_logprobs(server, event, stream.generated == 1)]} if body.logprobs \
                    else None
                if event.text or logprobs:
                    yield chunk({"content": event.text}, logprobs=logprobs)
                if event.finish_reason:
                    yield chunk({}, event.finish_reason)
            if include_usage:
                yield {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": _usage(len(prompt_ids), stream.generated)}
        return sse(chunks(), stream)

    events = await stream.collect(request)
    text = "".join(e.text for e in events)
    logprobs = [_chat_logprobs(server, e, i == 0) for i, e in enumerate(events)] if body.logprobs else []
    finish_reason = events[-1].finish_reason
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": {"content": logprobs} if body.logprobs else None, "finish_reason": finish_reason}],
        "usage": _usage(len(prompt_ids), stream.generated),
    }


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> dict | StreamingResponse:
    server: ServerState = request.app.state.server
    prompt_ids = await run_in_threadpool(server.llm.encode_prompt, body.prompt)
    params = _params(server, body, prompt_ids, body.max_tokens, body.logprobs is not None, body.logprobs or 0)
    stream = await RequestStream.open(server.engine, server.metrics, prompt_ids, params, prompt_as_context=True)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    model = body.model or server.model_name
    prefix = (body.prompt if isinstance(body.prompt, str) else server.llm.tokenizer.decode(prompt_ids)) \
        if body.echo else ""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def logprobs_of(events: list[TokenEvent], offset: int) -> dict:
        tokens, offsets, position = [], [], offset
        for event in events:
            tokens.append(_token_text(server, event.token_id)[0])
            offsets.append(position)
            position += len(event.text)
        top = [{_token_text(server, t)[0]: lp for t, lp in (e.top_logprobs or {}).items()} for e in events]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events], "top_logprobs": top,
                "text_offset": offsets}

    def choice(text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    if body.stream:
        async def chunks() -> AsyncIterator[dict]:
            offset = len(prefix)
            if prefix:
                yield {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [choice(prefix, None, None)]}
            async for event in stream.events():
                logprobs = logprobs_of([event], offset) if body.logprobs is not None else None
                offset += len(event.text)
                yield {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [choice(event.text, event.finish_reason, logprobs)]}
            if include_usage:
                yield {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": _usage(len(prompt_ids), stream.generated)}
        return sse(chunks(), stream)

    events = await stream.collect(request)
    text = prefix + "".join(e.text for e in events)
    logprobs = logprobs_of(events, len(prefix)) if body.logprobs is not None else None
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice(text, events[-1].finish_reason, logprobs)],
            "usage": _usage(len(prompt_ids), stream.generated)}
