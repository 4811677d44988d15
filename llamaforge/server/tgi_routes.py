"""TGI's routes: /generate, /generate_stream, the compat route /, /info, /health, /tokenize."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

import llamaforge
from llamaforge.errors import GenerationError
from llamaforge.generate import TokenEvent
from llamaforge.sampling import SamplingParams
from llamaforge.server.bridge import RequestStream, open_streams
from llamaforge.server.schemas import MAX_BEST_OF, TGIRequest, TokenizeRequest
from llamaforge.server.state import EventStream, ServerState, sse_event, tgi_error_body

router = APIRouter()
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default when the request gives none
FINISH_REASONS = {"length": "length", "stop": "stop_sequence", "eos": "eos_token"}


def _finish_reason(event: TokenEvent) -> str:
    return FINISH_REASONS["eos" if event.eos else event.finish_reason]


def _token(server: ServerState, event: TokenEvent) -> dict:
    return {"id": event.token_id, "text": event.text, "logprob": event.logprob,
            "special": event.token_id in (server.llm.tokenizer.bos_id, server.llm.tokenizer.eos_id)}


async def _start(server: ServerState, body: TGIRequest) -> list[RequestStream]:
    """Submit the request: one answer, or `best_of` sampled candidates (seeds counting up from a given seed)."""
    parameters = body.parameters
    unsupported = parameters.unsupported()
    if unsupported:
        # transformers' wording with a 400, which huggingface_hub's InferenceClient recognises and retries without.
        raise HTTPException(400, f"The following `model_kwargs` are not used by the model: {unsupported}")
    best_of = parameters.best_of or 1
    sampling = parameters.sampling()
    if best_of > 1 and sampling["temperature"] == 0:
        raise GenerationError("parameters.best_of > 1 needs sampling: set do_sample (or temperature, top_k, top_p)")
    if best_of > 1 and body.stream:
        raise GenerationError("parameters.best_of > 1 cannot stream: the best candidate is known only at the end")
    prompt_ids = await run_in_threadpool(server.llm.encode_prompt, body.inputs)
    if parameters.truncate is not None and len(prompt_ids) > parameters.truncate:
        prompt_ids = prompt_ids[-parameters.truncate:]
    adapter = server.adapter_slot(parameters.adapter_id, "parameters.adapter_id")
    requests = []
    for candidate in range(best_of):
        seed = None if sampling["seed"] is None else (sampling["seed"] + candidate) % 2**64
        requests.append((prompt_ids, SamplingParams(max_new_tokens=parameters.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                                    logprobs=True, **{**sampling, "seed": seed})))
    return await open_streams(server, requests, True, parameters.grammar_text(), "parameters.grammar",
                              adapter=adapter)


async def _generate(server: ServerState, body: TGIRequest, client: Request) -> dict:
    streams = await _start(server, body)
    answers = [await stream.collect(client) for stream in streams]
    # best_of: the candidate the model finds likeliest (highest sum of its tokens' log-probabilities), as TGI.
    best = max(range(len(answers)), key=lambda i: sum(e.logprob for e in answers[i]))

    def sequence(index: int) -> tuple[str, dict]:
        events = answers[index]
        text = "".join(e.text for e in events)
        return (body.inputs + text if body.parameters.return_full_text else text), {
            "finish_reason": _finish_reason(events[-1]), "generated_tokens": len(events),
            "seed": streams[index].request.params.seed, "prefill": [], "tokens": [_token(server, e) for e in events]}

    text, details = sequence(best)
    result = {"generated_text": text}
    if body.parameters.details:
        result["details"] = details
        if len(answers) > 1:
            details["best_of_sequences"] = [{"generated_text": other_text, **other}
                                            for other_text, other in (sequence(i) for i in range(len(answers))
                                                                      if i != best)]
    return result


async def _generate_stream(server: ServerState, body: TGIRequest) -> StreamingResponse:
    body = body.model_copy(update={"stream": True})  # /generate_stream streams whatever `stream` says
    (stream,) = await _start(server, body)

    async def lines() -> AsyncIterator[str]:
        text = ""
        try:
            async for event in stream.events():
                text += event.text
                payload = {"index": stream.generated, "token": _token(server, event), "generated_text": None,
                           "details": None, "top_tokens": None}
                if event.finish_reason:
                    payload["generated_text"] = body.inputs + text if body.parameters.return_full_text else text
                    payload["details"] = {"finish_reason": _finish_reason(event), "generated_tokens": stream.generated,
                                          "input_length": len(stream.request.prompt_ids), "seed": body.parameters.seed}
                yield sse_event(payload, prefix="data:")
        except Exception as exc:  # after the 200 went out: TGI reports errors in-band
            yield sse_event(tgi_error_body(exc, "generation"), prefix="data:")

    return EventStream(lines(), on_close=stream.close)


@router.post("/generate")
async def generate(body: TGIRequest, request: Request) -> dict:
    return await _generate(request.app.state.server, body, request)


@router.post("/generate_stream")
async def generate_stream(body: TGIRequest, request: Request) -> StreamingResponse:
    return await _generate_stream(request.app.state.server, body)


@router.post("/", response_model=None)
async def compat_generate(body: TGIRequest, request: Request) -> JSONResponse | StreamingResponse:
    """TGI's compat route: what `InferenceClient(url).text_generation()` posts to; `stream` picks the form."""
    server: ServerState = request.app.state.server
    if body.stream:
        return await _generate_stream(server, body)
    return JSONResponse([await _generate(server, body, request)])


@router.get("/info")
async def info(request: Request) -> dict:
    server: ServerState = request.app.state.server
    engine = server.engine
    return {
        "model_id": server.model_name, "model_sha": None, "model_pipeline_tag": "text-generation",
        "model_dtype": str(server.llm.dtype).replace("torch.", ""), "model_device_type": server.llm.device.type,
        "max_concurrent_requests": engine.max_batch_size + engine.max_queue, "max_best_of": MAX_BEST_OF,
        "max_stop_sequences": 4, "max_input_tokens": engine.max_context - 1, "max_total_tokens": engine.max_context,
        "max_client_batch_size": 1, "validation_workers": 1, "router": "llamaforge",
        "version": llamaforge.__version__, "sha": None, "docker_label": None,
    }


@router.get("/health", response_model=None)
async def health(request: Request) -> dict | JSONResponse:
    """200 while the engine serves; 503 naming why when its worker died or is stuck (TGI's /health is 200 or 503)."""
    problem = request.app.state.server.engine.health()
    if problem is not None:
        return JSONResponse(tgi_error_body(problem, "unhealthy"), status_code=503)
    return {}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> list[dict]:
    tokenizer = request.app.state.server.llm.tokenizer
    tokens = [{"id": tokenizer.bos_id, "text": "<s>", "start": 0, "stop": 0}] if body.add_special_tokens else []
    for token_id, start, stop in await run_in_threadpool(tokenizer.encode_with_offsets, body.inputs):
        tokens.append({"id": token_id, "text": body.inputs[start:stop], "start": start, "stop": stop})
    return tokens
