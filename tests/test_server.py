"""The live server with real clients: openai, huggingface_hub's InferenceClient, raw HTTP for the edges."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, content: str, **options) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **options)


# --- OpenAI --------------------------------------------------------------------------------------------

def test_chat_completion_matches_the_library(client, tiny_llm) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    expected = tiny_llm.chat(messages, max_new_tokens=12, **GREEDY)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(tiny_llm.chat_tokens(messages))
    assert response.usage.completion_tokens == len(expected.token_ids) + (expected.finish_reason == "stop")
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_stream_adds_up_and_reports_usage(client) -> None:
    whole = chat(client, "Tell me about llamas", max_tokens=20, **GREEDY)
    chunks = list(chat(client, "Tell me about llamas", max_tokens=20, stream=True,
                       stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_continues_the_prompt(client, tiny_llm) -> None:
    response = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, **GREEDY)
    expected = tiny_llm.generate("Once upon a time", max_new_tokens=10, **GREEDY)
    assert response.choices[0].text == expected.text
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    echoed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, echo=True, **GREEDY)
    assert echoed.choices[0].text == "Once upon a time" + expected.text


def test_completion_with_token_ids_and_logprobs(client, tiny_llm) -> None:
    prompt = tiny_llm.tokenizer.encode("Llamas", bos=True)
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, logprobs=2, **GREEDY)
    logprobs = response.choices[0].logprobs
    expected = tiny_llm.generate(prompt, max_new_tokens=5, logprobs=True, top_logprobs=2, **GREEDY)
    assert logprobs.token_logprobs == pytest.approx(expected.logprobs[:len(logprobs.token_logprobs)], abs=1e-4)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_chat_logprobs(client) -> None:
    response = chat(client, "Hi", max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy takes the top token
    if response.choices[0].finish_reason == "length":  # (an EOS token would be in the list, not in the text)
        assert "".join(entry.token for entry in content) == response.choices[0].message.content
    streamed = [c.choices[0].logprobs.content[0] for c in chat(client, "Hi", max_tokens=4, logprobs=True, stream=True,
                                                               **GREEDY) if c.choices and c.choices[0].logprobs]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_stop_string(client) -> None:
    reference = chat(client, "Count", max_tokens=30, **GREEDY).choices[0].message.content
    assert len(reference) > 10
    stop = reference[5:8]
    stopped = chat(client, "Count", max_tokens=30, stop=[stop], **GREEDY).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == reference[:reference.index(stop)]


def test_seed_reproducibility(client) -> None:
    def sample(seed: int) -> str:
        return chat(client, "Surprise me", max_tokens=16, temperature=1.0, seed=seed).choices[0].message.content

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_models(client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


# --- TGI -----------------------------------------------------------------------------------------------

def test_inference_client_generate_and_stream(live_server, tiny_llm) -> None:
    from huggingface_hub import InferenceClient

    hub = InferenceClient(live_server.url)
    expected = tiny_llm.generate("Once upon a time", max_new_tokens=8, **GREEDY)
    assert hub.text_generation("Once upon a time", max_new_tokens=8) == expected.text
    details = hub.text_generation("Once upon a time", max_new_tokens=8, details=True)
    assert details.generated_text == expected.text
    assert [t.id for t in details.details.tokens][:len(expected.token_ids)] == expected.token_ids
    assert details.details.finish_reason in ("length", "eos_token")
    assert "".join(hub.text_generation("Once upon a time", max_new_tokens=8, stream=True)) == expected.text
    last = list(hub.text_generation("Once upon a time", max_new_tokens=8, stream=True, details=True))[-1]
    assert last.generated_text == expected.text and last.details.generated_tokens == details.details.generated_tokens
    full = hub.text_generation("Once upon a time", max_new_tokens=8, return_full_text=True)
    assert full == "Once upon a time" + expected.text


def test_inference_client_best_of_keeps_the_likeliest_candidate(live_server, tiny_llm) -> None:
    """best_of=3 samples three candidates (seeds 7, 8, 9) and answers with the one of highest log-probability;
    the others come back in details.best_of_sequences. frequency_penalty reaches the sampler."""
    from huggingface_hub import InferenceClient

    hub = InferenceClient(live_server.url)
    options = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.0, "details": True}
    out = hub.text_generation("Llamas", best_of=3, seed=7, **options)
    candidates = [tiny_llm.generate("Llamas", max_new_tokens=6, temperature=1.0, top_p=1.0, seed=7 + i,
                                    logprobs=True) for i in range(3)]
    best = max(candidates, key=lambda c: sum(c.logprobs))
    assert out.generated_text == best.text
    assert sorted(s.generated_text for s in out.details.best_of_sequences) == sorted(
        c.text for c in candidates if c is not best)
    assert {s.seed for s in out.details.best_of_sequences} | {out.details.seed} == {7, 8, 9}
    penalised = hub.text_generation("Llamas hum hum", max_new_tokens=8, frequency_penalty=1.5)
    assert penalised == tiny_llm.generate("Llamas hum hum", max_new_tokens=8, frequency_penalty=1.5, **GREEDY).text


def test_inference_client_drops_what_we_do_not_support(live_server) -> None:
    """The client's own retry: it removes parameters the server names as unused."""
    from huggingface_hub import InferenceClient

    with pytest.warns(UserWarning, match="watermark"):
        text = InferenceClient(live_server.url).text_generation("Hi", max_new_tokens=3, watermark=True)
    assert isinstance(text, str)


def test_tgi_generate_route_sampling_rule(live_server, tiny_llm) -> None:
    body = {"inputs": "Llamas", "parameters": {"max_new_tokens": 6, "details": True, "seed": 3}}
    greedy = httpx.post(f"{live_server.url}/generate", json=body).json()
    assert greedy["generated_text"] == tiny_llm.generate("Llamas", max_new_tokens=6, **GREEDY).text
    sampled = {**body, "parameters": {**body["parameters"], "temperature": 1.5}}
    first = httpx.post(f"{live_server.url}/generate", json=sampled).json()
    assert first == httpx.post(f"{live_server.url}/generate", json=sampled).json()
    assert first["details"]["seed"] == 3


def test_info_health_tokenize(live_server, tiny_llm) -> None:
    info = httpx.get(f"{live_server.url}/info").json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == tiny_llm.config.context_length
    assert httpx.get(f"{live_server.url}/health").status_code == 200
    tokens = httpx.post(f"{live_server.url}/tokenize", json={"inputs": "Hello llamas"}).json()
    assert [t["id"] for t in tokens] == tiny_llm.tokenizer.encode("Hello llamas", bos=True)
    assert "".join(t["text"] for t in tokens[1:]) == "Hello llamas"


# --- concurrency, cancellation, back-pressure ---------------------------------------------------------

def test_32_concurrent_streams_equal_their_solo_runs(live_server) -> None:
    prompts = [f"Request {i}: " + "llama " * (i % 7) * 3 for i in range(32)]
    lengths = [4 + (i * 5) % 17 for i in range(32)]
    engine = live_server.engine

    async def run() -> tuple[list[str], list[str]]:
        aclient = openai.AsyncOpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)

        async def one(prompt: str, max_tokens: int) -> str:
            stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                      stream=True, **GREEDY)
            return "".join([chunk.choices[0].text async for chunk in stream])

        batched_at_start = engine.stats().batched_steps
        alone = [await one(p, n) for p, n in zip(prompts, lengths, strict=True)]
        batched_before = engine.stats().batched_steps
        assert batched_before == batched_at_start  # one at a time really ran alone
        together = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True)))
        assert engine.stats().batched_steps > batched_before + 10  # the batch really held several sequences
        await aclient.close()
        return alone, together

    alone, together = asyncio.run(run())
    assert together == alone
    assert engine.stats().peak_running == engine.max_batch_size
    metrics = httpx.get(f"{live_server.url}/metrics").text
    assert "llamaforge_peak_batch_size 4.0" in metrics


def test_disconnect_frees_the_slot(tiny_tokenizer_path) -> None:
    from factories import LiveServer, random_model, wait_for

    from llamaforge.api import LLM
    from llamaforge.config import ModelArgs
    from llamaforge.engine import Engine
    from llamaforge.server import create_app
    from llamaforge.tokenizer import Tokenizer

    # Slow enough (~10 ms a token) that the answer cannot finish on its own while the test watches;
    # greedy, this model does not emit EOS for hundreds of tokens.
    config = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=400, hidden_dim=1024, max_seq_len=4096)
    llm = LLM(random_model(config, std=0.02), Tokenizer(tiny_tokenizer_path))
    engine = Engine(llm, max_batch_size=2)
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3000, "stream": True,
            "temperature": 0}
    with LiveServer(create_app(llm, engine)) as server:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            chunks = (line for line in response.iter_lines() if line.startswith("data:"))
            for _ in range(3):
                next(chunks)
            assert engine.stats().running == 1
        # The connection closed mid-answer: the slot must come back long before 3000 tokens.
        assert wait_for(lambda: engine.stats().free_slots == 2, timeout=5)
        assert engine.stats().generated_tokens < 300


def test_full_queue_answers_503(tiny_llm) -> None:
    from factories import LiveServer

    from llamaforge.engine import Engine
    from llamaforge.server import create_app

    engine = Engine(tiny_llm, max_batch_size=1, max_queue=1)
    body = {"model": "tiny", "prompt": "Go", "max_tokens": 100, "temperature": 1.0}
    with LiveServer(create_app(tiny_llm, engine)) as server:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(http.post(f"{server.url}/v1/completions", json=body) for _ in range(6)))

        statuses = [r.status_code for r in asyncio.run(burst())]
        refused = [r for r in asyncio.run(burst()) if r.status_code == 503]
    assert 200 in statuses and 503 in statuses
    assert refused and refused[0].headers["retry-after"] == "1"
    assert "queue is full" in refused[0].json()["error"]["message"]


# --- bad input ------------------------------------------------------------------------------------------

def post(live_server, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(f"{live_server.url}{path}", json=body, **kwargs)
    return httpx.post(f"{live_server.url}{path}", content=body, headers={"content-type": "application/json"}, **kwargs)


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 5000}, 400,
     r"the prompt has \d+ tokens and max_new_tokens is 5000: \d+ tokens exceed the model's context of 128"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x [/INST] y"}]}, 400,
     "control tag '\\[/INST\\]'"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400,
     "role 'assistant' where 'user'"),
    ("/v1/chat/completions", {"messages": USER, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": USER, "n": 0}, 400, "^n: "),
    ("/v1/chat/completions", {"messages": USER, "n": 65}, 400, "^n: "),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 40}, 400, r"n or best_of \(40\) times the 2 prompts exceeds 64"),
    ("/v1/chat/completions", {"messages": USER, "frequency_penalty": 2.5}, 400, "^frequency_penalty: "),
    ("/v1/chat/completions", {"messages": USER, "presence_penalty": -3}, 400, "^presence_penalty: "),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"5": 101}}, 400, "^logit_bias: biases must be in"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"x": 1}}, 400, "^logit_bias: keys are token ids"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"400": 1}}, 400,
     r"logit_bias names token ids \[400\] past the vocabulary \(400 tokens"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", "{not json", 400, r"^the request body is not valid JSON \(.* at character 1\)$"),
    ("/v1/chat/completions", "", 400, "^the request body is empty; send a JSON object$"),
    ("/generate", "[1, 2]", 422, "^the request body must be a JSON object$"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400,
     "^messages.0.content: Input should be a valid string$"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "^tools: tools is not supported by this server; leave it out$"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, 400, "^tool_choice: .*asks for tool calls"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "yaml"}}, 400,
     "^response_format: .*type must be 'text', 'json_object' or 'json_schema'"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": 3}}, 400,
     "^response_format: .*json_schema must be an object"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}}, 400,
     "response_format: the grammar cannot be compiled"),
    ("/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "(unclosed"}}}, 422,
     "parameters.grammar"),
    ("/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "xml", "value": "x"}}}, 422,
     "parameters.grammar"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "^suffix: .*fill-in-the-middle"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "n": 3}, 400, r"best_of \(2\) must be at least n \(3\)"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of cannot stream"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, 400, "stream takes one prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "^prompt: .*a prompt is empty"),
    ("/v1/completions", {"prompt": [[1, 5], [1, 99999]]}, 400, "token-id prompt must hold ints"),
    ("/v1/completions", {"prompt": ["a"] * 65}, 400, "at most 64 prompts"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "token-id prompt must hold ints"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": 0}}, 422, "parameters.temperature"),
    ("/generate", {"inputs": "hi", "parameters": {"best_of": 2}}, 422, "best_of > 1 needs sampling"),
    ("/generate", {"inputs": "hi", "parameters": {"best_of": 5, "do_sample": True}}, 422, "parameters.best_of"),
    ("/generate_stream", {"inputs": "hi", "parameters": {"best_of": 2, "do_sample": True}}, 422, "cannot stream"),
    ("/generate", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 422, "parameters.top_p"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 500}}, 422, "exceed the model's context of 128"),
    ("/generate", {"inputs": ""}, 422, "inputs"),
    ("/generate_stream", {"parameters": {}}, 422, "inputs"),
])
def test_bad_input_is_named(live_server, path: str, body, status: int, message: str) -> None:
    import re

    response = post(live_server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    text = error["message"] if isinstance(error, dict) else error
    assert re.search(message, text), text


def test_oversized_body_is_refused(live_server) -> None:
    response = post(live_server, "/v1/completions", {"prompt": "x" * (2 << 20)})
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit must hold while the body streams in
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = httpx.post(f"{live_server.url}/v1/completions", content=chunked(),
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]
    assert 'llamaforge_requests_total{route="/v1/completions",status="413"} 2.0' in httpx.get(
        f"{live_server.url}/metrics").text


def test_api_key(tiny_llm) -> None:
    from factories import LiveServer

    from llamaforge.engine import Engine
    from llamaforge.server import create_app

    with LiveServer(create_app(tiny_llm, Engine(tiny_llm, max_batch_size=1), api_key="s3cret")) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        refused = httpx.get(f"{server.url}/v1/models")
        assert refused.status_code == 401 and "Authorization: Bearer" in refused.json()["error"]["message"]
        assert httpx.get(f"{server.url}/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        authed = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret")
        assert authed.models.list().data
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_metrics_count_requests_and_tokens(live_server, client) -> None:
    chat(client, "count me", max_tokens=3, **GREEDY)
    post(live_server, "/v1/chat/completions", {"messages": [], "model": "tiny"})
    text = httpx.get(f"{live_server.url}/metrics").text
    assert 'llamaforge_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'llamaforge_requests_total{route="/v1/chat/completions",status="400"}' in text
    for name in ("llamaforge_generated_tokens_total", "llamaforge_prompt_tokens_total", "llamaforge_queue_depth",
                 "llamaforge_running_batch_size", "llamaforge_time_to_first_token_seconds_bucket",
                 "llamaforge_inter_token_latency_seconds_bucket"):
        assert name in text
    generated = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith("llamaforge_generated_tokens_total")))
    assert generated >= 3


def test_sse_ends_with_done(live_server) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{live_server.url}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[5:])["object"] == "chat.completion.chunk" for e in events[:-1])


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny", "max_tokens": 2, "stream": True, "echo": True}),
    ("/generate_stream", {"parameters": {"max_new_tokens": 2, "return_full_text": True}}),
])
def test_sse_events_survive_unicode_line_breaks(live_server, path: str, body: dict) -> None:
    # U+2028, U+2029 and NEL are no line breaks to JSON, but httpx's iter_lines (str.splitlines) splits on them:
    # an event must not hold them raw, or such a client reads half an event.
    text = "one\u2028two\u2029three\x85four"
    body = {**body, "prompt" if path.startswith("/v1") else "inputs": text}
    with httpx.stream("POST", f"{live_server.url}{path}", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    payloads = [json.loads(e[5:]) for e in events if e != "data: [DONE]"]
    first = payloads[0]["choices"][0]["text"] if path.startswith("/v1") else payloads[-1]["generated_text"]
    assert first.startswith(text)


def test_echo_with_logprobs_scores_every_prompt_token(live_server, client, tiny_llm) -> None:
    """Several token prompts, max_tokens 0: each comes back with its log-probabilities (None first), as a forward
    of the model computes them, and nothing generated."""
    prompts = [tiny_llm.tokenizer.encode(text, bos=True) for text in ("The llama hums", "Rivers run to the sea")]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == sum(map(len, prompts))
    for prompt, choice in zip(prompts, out.choices, strict=True):
        assert choice.text == tiny_llm.tokenizer.decode(prompt) and choice.finish_reason == "length"
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(prompt) and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None and all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
        with torch.inference_mode():
            expected = tiny_llm.model(torch.tensor([prompt])).float().log_softmax(-1)[0]  # (T, V)
        reference = expected[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
        assert logprobs.token_logprobs[1:] == pytest.approx(reference.tolist(), abs=1e-5)
        assert [max(top.values()) for top in logprobs.top_logprobs[1:]] == pytest.approx(
            expected[:-1].max(-1).values.tolist(), abs=1e-5)
    # With one new token, the answer's log-probability follows the prompt's.
    one = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
    assert len(one.choices[0].logprobs.token_logprobs) == len(prompts[0]) + 1
    assert one.choices[0].logprobs.token_logprobs[:-1] == out.choices[0].logprobs.token_logprobs
    assert one.usage.completion_tokens == 1


def test_n_choices_are_the_answers_of_consecutive_seeds(live_server, client, tiny_llm) -> None:
    """n=3 with a seed: choice i is what one request with seed + i answers, whole or streamed."""
    messages = [{"role": "user", "content": "Name a llama."}]
    options = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 1.0}
    out = client.chat.completions.create(n=3, seed=11, **options)
    assert [c.index for c in out.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(seed=11 + i, **options) for i in range(3)]
    assert [c.message.content for c in out.choices] == [a.choices[0].message.content for a in alone]
    assert len({a.choices[0].message.content for a in alone}) > 1
    assert out.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert out.usage.prompt_tokens == alone[0].usage.prompt_tokens
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(n=3, seed=11, stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [a.choices[0].message.content for a in alone]
    texts = client.completions.create(model="tiny", prompt=["A llama", "Two llamas"], n=2, seed=5, max_tokens=5)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]
    second = client.completions.create(model="tiny", prompt="Two llamas", seed=6, max_tokens=5)
    assert texts.choices[3].text == second.choices[0].text
    # best_of 4, n 2: the two likeliest of the four candidates seeds 5 .. 8 give, likeliest first.
    best = client.completions.create(model="tiny", prompt="A llama", n=2, best_of=4, seed=5, max_tokens=5)
    candidates = [tiny_llm.generate("A llama", max_new_tokens=5, temperature=1.0, top_p=1.0, seed=5 + i,
                                    logprobs=True) for i in range(4)]
    ranked = sorted(candidates, key=lambda c: -sum(c.logprobs))
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]] and best.choices[0].logprobs is None
    assert texts.usage.prompt_tokens == sum(len(tiny_llm.tokenizer.encode(p, bos=True)) for p in ("A llama",
                                                                                                   "Two llamas"))


def test_logit_bias_and_penalties_reach_the_sampler(live_server, client, tiny_llm) -> None:
    """The server's answers equal the library's with the same logit bias and penalties."""
    prompt = "Llamas hum and hum and hum"
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    first = tiny_llm.generate(prompt, max_new_tokens=8, temperature=0.0).token_ids[0]
    biased = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                       logit_bias={str(first): -100}, frequency_penalty=1.5, presence_penalty=0.5)
    expected = tiny_llm.generate(prompt, max_new_tokens=8, temperature=0.0, logit_bias={first: -100.0},
                                 frequency_penalty=1.5, presence_penalty=0.5)
    assert biased.choices[0].text == expected.text != plain.choices[0].text
    forced = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0.8, seed=1, logit_bias={"77": 100})
    assert forced.choices[0].message.content == tiny_llm.tokenizer.decode([77] * 4)
