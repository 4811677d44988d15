"""OpenAI's /v1/chat/completions, /v1/completions and /v1/models, streaming as server-sent events."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from llamaforge.adapters import AdapterStack
from llamaforge.generate import TokenEvent
from llamaforge.lora import AdapterError
from llamaforge.sampling import SamplingParams
from llamaforge.server.bridge import RequestStream, merged, open_streams
from llamaforge.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    OpenAIRequest,
    UnloadAdapterRequest,
)
from llamaforge.server.state import EventStream, ModelNotFound, ServerState, openai_error_body, sse_event

router = APIRouter()


def sse(payloads: AsyncIterator[dict], *streams: RequestStream) -> StreamingResponse:
    """Server-sent events, one JSON object each, closed by OpenAI's `data: [DONE]`."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for payload in payloads:
                yield sse_event(payload)
        except Exception as exc:  # an error after the 200 went out: tell the client in-band
            yield sse_event(openai_error_body(exc))
        yield "data: [DONE]\n\n"

    def close() -> None:
        for stream in streams:
            stream.close()

    return EventStream(lines(), on_close=close)


def _params(server: ServerState, body: OpenAIRequest, prompt_ids: list[int], max_tokens: int | None,
            logprobs: bool, top_logprobs: int, choice: int = 0) -> SamplingParams:
    """Sampling parameters from the body for its `choice`-th answer (of n: a given seed counts up, so the answers
    are reproducible and differ); without max_tokens, the answer may fill the rest of the context."""
    room = max(1, server.engine.max_context - len(prompt_ids))
    sampling = body.sampling()
    if sampling["seed"] is not None:
        sampling["seed"] = (sampling["seed"] + choice + 2**63) % 2**64 - 2**63  # stays a signed 64-bit seed
    return SamplingParams(max_new_tokens=max_tokens or room, logprobs=logprobs, top_logprobs=top_logprobs,
                          **sampling)


async def _open_all(server: ServerState, body: OpenAIRequest, requests: list[tuple[list[int], SamplingParams]],
                    prompt_as_context: bool, prompt_logprobs: int | None = None) -> list[RequestStream]:
    """Submit every (prompt, params) for the body's model, each held to its response_format if it has one."""
    return await open_streams(server, requests, prompt_as_context, body.grammar(), "response_format", prompt_logprobs,
                              server.adapter_slot(body.model))


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


def _by_text(server: ServerState, top: dict[int, float] | None) -> dict[str, float] | None:
    """Top log-probabilities keyed by token text, as legacy completions give them; where two tokens read alike
    (byte tokens of broken UTF-8), the likelier one's, so the highest value is still the best token's."""
    if top is None:
        return None
    by_text: dict[str, float] = {}
    for token_id, logprob in sorted(top.items(), key=lambda item: -item[1]):
        by_text.setdefault(_token_text(server, token_id)[0], logprob)
    return by_text


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The base model, then each LoRA adapter served on it (with vLLM's `parent` and `root`)."""
    server: ServerState = request.app.state.server
    models = [{"id": server.model_name, "object": "model", "created": server.created, "owned_by": "llamaforge",
               "parent": None, "root": str(server.llm.source)}]
    adapters = server.llm.adapters
    for name in adapters.slots if adapters is not None else ():
        models.append({"id": name, "object": "model", "created": server.created, "owned_by": "llamaforge",
                       "parent": server.model_name, "root": adapters.paths[name]})
    return {"object": "list", "data": models}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadAdapterRequest, request: Request) -> dict:
    """Load a peft adapter as a model name at run time (vLLM's route); it is served from the next step."""
    server: ServerState = request.app.state.server
    adapters = _served_adapters(server)
    slot = await run_in_threadpool(server.engine.between_steps, lambda: adapters.add(body.lora_name, body.lora_path))
    return {"object": "lora_adapter", "id": body.lora_name, "slot": slot}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadAdapterRequest, request: Request) -> dict:
    """Unload an adapter no request is using (vLLM's route)."""
    server: ServerState = request.app.state.server
    adapters = _served_adapters(server)
    if body.lora_name not in adapters.slots:
        loaded = ", ".join(adapters.slots) or "none"
        raise ModelNotFound(f"lora_name {body.lora_name!r} is not loaded; loaded: {loaded}")

    def unload() -> None:
        server.engine.forget_adapter(adapters.slots[body.lora_name])
        adapters.remove(body.lora_name)

    await run_in_threadpool(server.engine.between_steps, unload)
    return {"object": "lora_adapter", "id": body.lora_name, "deleted": True}


def _served_adapters(server: ServerState) -> AdapterStack:
    if server.llm.adapters is None:
        raise AdapterError("this server serves no adapters; start it with --adapter NAME=PATH (and --max-loras for "
                           "room to load more at run time)")
    return server.llm.adapters


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict | StreamingResponse:
    server: ServerState = request.app.state.server
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = await run_in_threadpool(server.llm.chat_tokens, messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    streams = await _open_all(server, body, [(prompt_ids, _params(server, body, prompt_ids, max_tokens, body.logprobs,
                                                            body.top_logprobs or 0, choice))
                                       for choice in range(body.n)], prompt_as_context=False)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model = body.model or server.model_name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                "finish_reason": finish_reason}]}
        if include_usage:
            payload["usage"] = None
        return payload

    if body.stream:
        async def chunks() -> AsyncIterator[dict]:
            for index in range(body.n):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for index, event in merged(streams):
                first = streams[index].generated == 1
                logprobs = {"content": [_chat_logprobs(server, event, first)]} if body.logprobs else None
                if event.text or logprobs:
                    yield chunk(index, {"content": event.text}, logprobs=logprobs)
                if event.finish_reason:
                    yield chunk(index, {}, event.finish_reason)
            if include_usage:
                yield {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": _usage(len(prompt_ids), sum(s.generated for s in streams))}
        return sse(chunks(), *streams)

    choices = []
    for index, stream in enumerate(streams):
        events = await stream.collect(request)
        logprobs = [_chat_logprobs(server, e, i == 0) for i, e in enumerate(events)] if body.logprobs else []
        choices.append({"index": index, "message": {"role": "assistant", "content": "".join(e.text for e in events)},
                        "logprobs": {"content": logprobs} if body.logprobs else None,
                        "finish_reason": events[-1].finish_reason})
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": _usage(len(prompt_ids), sum(s.generated for s in streams))}


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> dict | StreamingResponse:
    """Legacy completions: one or several prompts (choices in order); with `echo` the prompt comes back before
    the answer, and with `logprobs` too each prompt token's log-probability (None for the first) and top
    alternatives, as lm-evaluation-harness's `local-completions` model scores tasks; `max_tokens: 0` only scores."""
    server: ServerState = request.app.state.server
    prompts = body.prompts()
    prompt_ids = [await run_in_threadpool(server.llm.encode_prompt, prompt) for prompt in prompts]
    score_prompt = body.echo and body.logprobs is not None
    # max_tokens 0: the one token the prefill samples anyway is left out (no forward is spent on it).
    max_tokens = max(body.max_tokens, 1) if body.max_tokens is not None else None
    # Candidates prompt by prompt (best_of, else n, each); with best_of > n the n likeliest of each are answered,
    # ranked by their tokens' log-probabilities, which every candidate then computes.
    per_prompt = body.candidates()
    ranking = per_prompt > body.n
    prompt_ids = [ids for ids in prompt_ids for _ in range(per_prompt)]
    prompts = [prompt for prompt in prompts for _ in range(per_prompt)]
    wants_logprobs = ranking or body.logprobs is not None
    requests = [(ids, _params(server, body, ids, max_tokens, wants_logprobs, body.logprobs or 0, index % per_prompt))
                for index, ids in enumerate(prompt_ids)]
    streams = await _open_all(server, body, requests,
                              prompt_as_context=True, prompt_logprobs=body.logprobs if score_prompt else None)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    model = body.model or server.model_name
    prefixes = [(prompt if isinstance(prompt, str) else server.llm.tokenizer.decode(ids)) if body.echo else ""
                for prompt, ids in zip(prompts, prompt_ids, strict=True)]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    answering = body.max_tokens != 0

    def logprobs_of(token_ids: list[int], texts: list[str], logprobs: list, tops: list, offset: int) -> dict:
        """Legacy logprobs of tokens whose `texts` (what each adds to the choice's text) start at `offset`."""
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": [_token_text(server, t)[0] for t in token_ids], "token_logprobs": logprobs,
                "top_logprobs": [_by_text(server, t) for t in tops], "text_offset": offsets}

    def prompt_logprobs(ids: list[int], first: TokenEvent) -> dict:
        texts = [_token_text(server, t)[0] for t in ids]
        return logprobs_of(ids, texts, first.prompt_logprobs, first.prompt_top_logprobs, 0)

    def answer_logprobs(events: list[TokenEvent], offset: int) -> dict:
        return logprobs_of([e.token_id for e in events], [e.text for e in events], [e.logprob for e in events],
                           [e.top_logprobs or {} for e in events], offset)

    def joined(parts: list[dict]) -> dict:
        return {key: [value for part in parts for value in part[key]] for key in parts[0]}

    def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    if body.stream:  # one prompt, n choices
        ids, prefix = prompt_ids[0], prefixes[0]

        async def chunks() -> AsyncIterator[dict]:
            def payload(*choices: dict) -> dict:
                return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                        "choices": list(choices)}

            offsets = [len(prefix)] * len(streams)
            async for index, event in merged(streams):
                if prefix and streams[index].generated == 1:
                    yield payload(choice(index, prefix, None, prompt_logprobs(ids, event) if score_prompt else None))
                if not answering:
                    yield payload(choice(index, "", "length", None))
                    continue
                logprobs = answer_logprobs([event], offsets[index]) if body.logprobs is not None else None
                offsets[index] += len(event.text)
                yield payload(choice(index, event.text, event.finish_reason, logprobs))
            if include_usage:
                generated = sum(s.generated for s in streams) if answering else 0
                yield {**payload(), "usage": _usage(len(ids), generated)}
        return sse(chunks(), *streams)

    answers = [await stream.collect(request) for stream in streams]
    completion_tokens = sum(len(events) for events in answers) if answering else 0
    kept = []  # the candidates answered, in choice order
    for start in range(0, len(answers), per_prompt):
        group = range(start, start + per_prompt)
        kept += sorted(group, key=lambda i: -sum(e.logprob for e in answers[i]))[:body.n] if ranking else group
    choices = []
    for index, candidate in enumerate(kept):
        events, ids, prefix = answers[candidate], prompt_ids[candidate], prefixes[candidate]
        answer = events if answering else []
        logprobs = None
        if body.logprobs is not None:
            parts = [prompt_logprobs(ids, events[0])] if score_prompt else []
            logprobs = joined(parts + ([answer_logprobs(answer, len(prefix))] if answer or not parts else []))
        finish_reason = events[-1].finish_reason if answering else "length"
        choices.append(choice(index, prefix + "".join(e.text for e in answer), finish_reason, logprobs))
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": _usage(sum(map(len, prompt_ids[::per_prompt])), completion_tokens)}
