"""Many LoRA adapters on one base: each request's answer is its adapter's, whatever shares its batch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from factories import submit_all, write_adapter

import llamaforge
from llamaforge.adapters import AdapterStack
from llamaforge.config import ModelArgs
from llamaforge.engine import Engine
from llamaforge.lora import AdapterError
from llamaforge.quantize import kernels
from llamaforge.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_config: ModelArgs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"colors": write_adapter(root / "colors", tiny_config, 1, 4, ("q_proj", "v_proj")),
            "numbers": write_adapter(root / "numbers", tiny_config, 2, 8, ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"))}


def test_each_request_answers_as_its_adapter_alone(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    """Base and two adapters (different ranks and layers), mixed in one batch and in every order, each equal to
    `load(adapter=...)` generating alone; the prefix cache never hands one adapter's keys to another."""
    llm = llamaforge.load(tiny_model_dir)
    stack = llm.adapters = AdapterStack(llm.model, max_adapters=3, max_rank=8)
    slots = {name: stack.add(name, path) for name, path in adapters.items()}
    prompts = [llm.tokenizer.encode(f"Story {i}: the llama", bos=True) for i in range(3)]
    expected = {None: [llm.generate(p, params=GREEDY).token_ids for p in prompts]}
    for name, path in adapters.items():
        alone = llamaforge.load(tiny_model_dir, adapter=path)
        expected[name] = [alone.generate(p, params=GREEDY).token_ids for p in prompts]
    assert expected["colors"] != expected[None] != expected["numbers"]
    engine = Engine(llm, max_batch_size=4).start()
    try:
        for order in ([None, "colors", "numbers"], ["numbers", None, "colors"]):
            requests = [(p, name) for name in order for p in prompts]
            results = submit_requests(engine, requests, slots)
            assert results == [expected[name][i] for name in order for i in range(3)]
    finally:
        engine.stop()
    assert stack.selection.rows is None  # reset after every forward


def submit_requests(engine: Engine, requests: list[tuple[list[int], str | None]], slots: dict[str, int]) -> list:
    """Greedy answers of (prompt, adapter name or None for the base) requests, all submitted at once."""
    return submit_all(engine, [prompt for prompt, _ in requests], GREEDY, 120,
                      [slots.get(name, 0) for _, name in requests])


def test_base_requests_are_unchanged_by_loaded_adapters(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    llm = llamaforge.load(tiny_model_dir)
    prompts = [llm.tokenizer.encode("Once upon a time", bos=True)]
    plain = [llm.generate(p, params=GREEDY).token_ids for p in prompts]
    llm.adapters = AdapterStack(llm.model, max_adapters=2, max_rank=8)
    llm.adapters.add("colors", adapters["colors"])
    engine = Engine(llm, max_batch_size=2).start()
    try:
        assert submit_all(engine, prompts, GREEDY) == plain
    finally:
        engine.stop()


def test_adapters_that_do_not_fit_are_refused_by_name(tmp_path: Path, tiny_model_dir: Path,
                                                      adapters: dict[str, Path]) -> None:
    llm = llamaforge.load(tiny_model_dir)
    stack = AdapterStack(llm.model, max_adapters=1, max_rank=4)
    with pytest.raises(AdapterError, match="rank 8 .* takes rank 4 at most"):
        stack.add("numbers", adapters["numbers"])
    other = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=64, max_seq_len=128)
    with pytest.raises(AdapterError, match="trained on another model size"):
        stack.add("small", write_adapter(tmp_path / "small", other, 3, 4, ("q_proj",)))
    stack.add("colors", adapters["colors"])
    with pytest.raises(AdapterError, match="already loaded"):
        stack.add("colors", adapters["colors"])
    with pytest.raises(AdapterError, match="all 1 adapter slots are in use"):
        stack.add("more", adapters["colors"])
    stack.remove("colors")
    assert stack.add("more", adapters["colors"]) == 1
    with pytest.raises(AdapterError, match="no adapter named 'colors'"):
        stack.remove("colors")


def test_a_bfloat16_model_decodes_adapter_rows_on_its_fused_path(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo model (bfloat16, fused decode layers): a batch of base and adapter rows decodes through the fused
    layers, which add each row's update; each answers as the model with that adapter alone (unmerged, torch)."""
    llm = llamaforge.load()
    if llm.model.fused_decode is None:
        pytest.skip("this CPU has no fused decode path (AVX-512 or AVX2)")
    path = write_adapter(tmp_path / "demo-adapter", llm.config, 5, 4, ("q_proj", "v_proj", "down_proj"))
    question = [{"role": "user", "content": "What is 12 plus 30?"}]
    prompt = llm.chat_tokens(question)
    base = llm.generate(prompt, params=GREEDY).token_ids
    adapted = llamaforge.load(adapter=path, merge_adapter=False).generate(prompt, params=GREEDY).token_ids
    assert base != adapted
    llm.adapters = AdapterStack(llm.model, max_adapters=1, max_rank=4)
    slot = llm.adapters.add("tuned", path)
    engine = Engine(llm, max_batch_size=2).start()
    calls = []
    fused = llm.model.fused_decode
    original = type(fused).__call__
    monkeypatch.setattr(type(fused), "__call__", lambda self, *args: calls.append(1) or original(self, *args))
    try:
        assert submit_requests(engine, [(prompt, None), (prompt, "tuned")], {"tuned": slot}) == [base, adapted]
        assert len(calls) >= GREEDY.max_new_tokens - 1, "decode steps with an adapter row run the fused layers"
    finally:
        engine.stop()


@pytest.mark.skipif(kernels.native_decode() is None, reason="the bfloat16 LoRA kernel needs AVX-512 or AVX2, and cc")
def test_the_bfloat16_kernel_adds_the_updates_torch_computes() -> None:
    """kernels.bf16_lora (what bfloat16 CPU models use, fused or not) against the update in float64: within one
    bfloat16 step (float32 sums in another order), and base rows untouched."""
    generator = torch.Generator().manual_seed(0)
    slots, rank, K, N = 3, 8, 200, 300  # widths that are not multiples of 16
    a = torch.randn(slots, rank, K, generator=generator) * 0.2
    b = torch.randn(slots, rank, N, generator=generator) * 0.2
    a[0], b[0] = 0, 0
    x = torch.randn(4, 5, K, generator=generator).bfloat16()
    y = torch.randn(4, 5, N, generator=generator).bfloat16()
    ids = torch.tensor([2, 0, 1, 2])
    out = kernels.bf16_lora(x, y, a, b, ids)
    update = torch.einsum("btk,brk,brn->btn", x.double(), a[ids].double(), b[ids].double())
    expected = (y.double() + update.to(torch.bfloat16).double()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out[1], y[1])
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=2**-8 * update.abs().max().item())
    assert (out != expected).float().mean() < 0.02
    assert not torch.equal(out[0], y[0])


@pytest.fixture(scope="module")
def adapter_server(tiny_model_dir: Path, adapters: dict[str, Path]):
    pytest.importorskip("fastapi")
    from factories import LiveServer

    from llamaforge.server import create_app

    llm = llamaforge.load(tiny_model_dir)
    llm.adapters = AdapterStack(llm.model, max_adapters=3, max_rank=8)
    llm.adapters.add("colors", adapters["colors"])
    engine = Engine(llm, max_batch_size=4)
    with LiveServer(create_app(llm, engine, model_name="tiny")) as server:
        server.llm, server.engine = llm, engine
        yield server


def test_requests_pick_an_adapter_by_model_name(adapter_server, tiny_model_dir: Path, adapters: dict[str, Path]):
    """The openai client and InferenceClient pick the adapter by `model` / adapter_id, side by side with the
    base, concurrently; each answer equals that adapter's alone. /v1/models lists them; unknown names are 404."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from huggingface_hub import InferenceClient

    client = openai.OpenAI(base_url=f"{adapter_server.url}/v1", api_key="none")
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["tiny", "colors"] and models["colors"].model_extra["parent"] == "tiny"
    messages = [{"role": "user", "content": "Name a color."}]
    colored = llamaforge.load(tiny_model_dir, adapter=adapters["colors"])
    expected = {"tiny": adapter_server.llm.chat(messages, max_new_tokens=8, temperature=0.0).text,
                "colors": colored.chat(messages, max_new_tokens=8, temperature=0.0).text}
    assert expected["tiny"] != expected["colors"]
    names = ["tiny", "colors"] * 4
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda name: client.chat.completions.create(
            model=name, messages=messages, max_tokens=8, temperature=0).choices[0].message.content, names))
    assert answers == [expected[name] for name in names]
    hub = InferenceClient(adapter_server.url)
    prompt = "Once upon a time"
    assert hub.text_generation(prompt, max_new_tokens=6, adapter_id="colors") == \
        colored.generate(prompt, max_new_tokens=6, temperature=0.0).text
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="colours", messages=messages, max_tokens=2)
    assert caught.value.code == "model_not_found" and "serves tiny, colors" in caught.value.message


def test_adapters_load_and_unload_at_run_time(adapter_server, tiny_model_dir: Path, adapters: dict[str, Path],
                                              tmp_path: Path, tiny_config: ModelArgs) -> None:
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{adapter_server.url}/v1", api_key="none")
    url = adapter_server.url
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "numbers",
                                                             "lora_path": str(adapters["numbers"])})
    assert loaded.status_code == 200, loaded.text
    prompt = "Count: one two"
    expected = llamaforge.load(tiny_model_dir, adapter=adapters["numbers"]).generate(prompt, max_new_tokens=6,
                                                                                      temperature=0.0).text
    assert client.completions.create(model="numbers", prompt=prompt, max_tokens=6, temperature=0).choices[0].text \
        == expected
    other = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=64, max_seq_len=128)
    wrong = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "small", "lora_path": str(
        write_adapter(tmp_path / "small", other, 3, 4, ("q_proj",)))})
    assert wrong.status_code == 400 and "trained on another model size" in wrong.json()["error"]["message"]
    missing = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "no")})
    assert missing.status_code == 400 and "adapter_config.json" in missing.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "numbers"}).status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny", "colors"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="numbers", prompt=prompt, max_tokens=2)
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "numbers"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    stats = adapter_server.llm.adapters
    assert stats.free == [2, 3] and stats.selection.rows is None


def test_a_run_of_failures_leaks_nothing(adapter_server, tmp_path: Path) -> None:
    """Refused loads and requests, an unknown model, an uncompilable grammar, and a stream its client drops while an
    adapter row decodes: afterwards /metrics shows every slot free, the same adapters loaded and nothing queued,
    and the adapter answers as before."""
    import re

    import httpx
    import openai

    url, client = adapter_server.url, openai.OpenAI(base_url=f"{adapter_server.url}/v1", api_key="none")

    def gauges() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics").text
        return {name: float(value) for name, value in re.findall(r"^(llamaforge_\w+) ([0-9.e+-]+)$", text, re.M)}

    def ask() -> str:
        answer = client.completions.create(model="colors", prompt="The sky is", max_tokens=6, temperature=0)
        return answer.choices[0].text

    expected, before = ask(), gauges()
    assert before["llamaforge_lora_adapters"] == len(adapter_server.llm.adapters.slots) >= 1
    refused = [
        httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "none")}),
        httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "not-loaded"}),
        httpx.post(f"{url}/v1/completions", json={"model": "no-such-model", "prompt": "x"}),
        httpx.post(f"{url}/v1/completions", json={"model": "colors", "prompt": ["a", "b"], "n": 40}),
        httpx.post(f"{url}/v1/chat/completions", json={"model": "colors", "messages": USER, "logit_bias": {"400": 1}}),
        httpx.post(f"{url}/v1/chat/completions", json={"model": "colors", "messages": USER, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}}),
    ]
    assert [r.status_code for r in refused] == [400, 404, 404, 400, 400, 400], [r.text for r in refused]
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "colors", "prompt": "Once", "max_tokens": 100,
                                                                "stream": True, "temperature": 0}) as stream:
        for _ in zip(range(3), stream.iter_lines(), strict=False):
            pass  # a few events, then the client goes away
    deadline = time.monotonic() + 30
    while (after := gauges())["llamaforge_running_batch_size"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after["llamaforge_running_batch_size"] == after["llamaforge_queue_depth"] == 0
    assert after["llamaforge_free_slots"] == before["llamaforge_free_slots"] == adapter_server.engine.max_batch_size
    assert after["llamaforge_kv_cache_blocks_used"] == 0 < after["llamaforge_kv_cache_blocks"]
    assert after["llamaforge_lora_adapters"] == before["llamaforge_lora_adapters"]
    assert adapter_server.llm.adapters.selection.rows is None
    assert ask() == expected


USER = [{"role": "user", "content": "hi"}]


def test_serve_takes_named_and_merged_adapters(tiny_model_dir: Path, adapters: dict[str, Path], monkeypatch) -> None:
    from factories import free_port

    import llamaforge.server
    from llamaforge.cli import main

    calls = []
    monkeypatch.setattr(llamaforge.server, "serve", lambda llm, **options: calls.append(llm))
    assert main(["serve", "--model", str(tiny_model_dir), "--port", str(free_port()), "--adapter",
                 f"colors={adapters['colors']}", "--adapter", f"numbers={adapters['numbers']}",
                 "--max-loras", "4"]) == 0
    stack = calls[0].adapters
    assert stack.slots == {"colors": 1, "numbers": 2} and stack.free == [3, 4] and stack.max_rank == 8
    assert main(["serve", "--model", str(tiny_model_dir), "--port", str(free_port()), "--adapter", "a=",
                 "--adapter", "b=x"]) == 2
