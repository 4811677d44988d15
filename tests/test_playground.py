"""The chat page at GET /, driven in real headless Chromium against the live server and the tiny model.

The page must stream the same text the OpenAI route returns for the same request, keep the turns, send the
system prompt, clear on "New chat", show the server's errors, stop an answer, and fit a phone's width.
Set LLAMAFORGE_SCREENSHOT=docs/playground.png to refresh the screenshot in the docs (from stories260K).
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 20_000

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the dev extra is not installed: the browser tests skip
    expect = sync_playwright = None


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium); the playground tests need it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):
    """A desktop-sized page that may reach the live server only (offline: no CDN, no fonts), and has no JS errors."""
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(TIMEOUT_MS)
    foreign: list[str] = []

    def local_only(route) -> None:
        if route.request.url.startswith(live_server.url + "/"):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    context.route("**/*", local_only)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not foreign, f"the page asked for something beyond its server: {foreign}"


@pytest.fixture
def slow_engine(live_server, monkeypatch):
    """Slow each engine step down, so streaming comes in visible pieces and a click lands mid-answer."""
    engine = live_server.engine
    step = engine._step

    def slow_step():
        time.sleep(0.03)
        step()

    monkeypatch.setattr(engine, "_step", slow_step)
    return engine


class Chat:
    """The page's controls, and the chat requests it sends."""

    def __init__(self, page, url: str) -> None:
        self.page = page
        self.requests: list[dict] = []
        page.on("request", self._record)
        page.goto(url)

    def _record(self, request) -> None:
        if request.url.endswith("/v1/chat/completions") and request.method == "POST":
            self.requests.append(json.loads(request.post_data))

    def settings(self, temperature: str | None = None, max_tokens: str | None = None, system: str | None = None):
        """Fill the settings given (as typed); None leaves one as it is."""
        details = self.page.locator("#settings")
        if not details.evaluate("node => node.open"):
            self.page.get_by_text("Settings", exact=True).click()
        if temperature is not None:  # the left (or only) column's; the right column has its own
            self.page.locator("#temperature").fill(temperature)
        if max_tokens is not None:
            self.page.get_by_label("Max tokens").fill(max_tokens)
        if system is not None:
            self.page.get_by_label("System prompt").fill(system)

    def say(self, text: str) -> None:
        box = self.page.get_by_label("Message", exact=True)
        box.fill(text)
        box.press("Enter")

    def answers(self):
        return self.page.locator(".message.assistant")

    def finished_answer(self, index: int) -> str:
        """The text of answer `index` once its stats line shows."""
        answer = self.answers().nth(index)
        expect(answer.locator(".stats")).to_be_visible()
        return answer.locator(".content").text_content()


@contextmanager
def serve(llm, **options):
    """A second live server, for a model or an option the shared `live_server` does not have."""
    from factories import LiveServer

    from llamaforge.engine import Engine
    from llamaforge.server import create_app

    with LiveServer(create_app(llm, Engine(llm, max_batch_size=1, max_queue=4), **options)) as server:
        yield server


@contextmanager
def new_page(browser, viewport: dict):
    """A page of its own (for a server other than `live_server`), light colours, closed afterwards."""
    context = browser.new_context(viewport=viewport, color_scheme="light")
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def reference(url: str, body: dict) -> str:
    """What the OpenAI route answers, without streaming, to the request the page sent."""
    plain = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
    response = httpx.post(f"{url}/v1/chat/completions", json=plain, timeout=30)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def test_page_is_self_contained(live_server) -> None:
    html = httpx.get(live_server.url + "/").text
    assert "/static/style.css" in html and "/static/app.js" in html
    for asset in ("style.css", "app.js"):
        assert httpx.get(f"{live_server.url}/static/{asset}").status_code == 200
    # No CDN, no web fonts: nothing but this server is referenced.
    for text in (html, httpx.get(live_server.url + "/static/app.js").text,
                 httpx.get(live_server.url + "/static/style.css").text):
        assert not re.search(r"https?://", text)


def test_streams_multi_turn_chat_with_tokens_per_second(page, live_server, slow_engine) -> None:
    chat = Chat(page, live_server.url)
    expect(page.locator("#model-name")).to_have_text("tiny")
    chat.settings(temperature="0", max_tokens="12")
    page.evaluate("""() => {
        window.seenLengths = new Set();
        new MutationObserver(() => {
            const answer = document.querySelector('.message.assistant:last-of-type .content');
            if (answer && answer.textContent) window.seenLengths.add(answer.textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")

    chat.say("Hello llama")
    expect(page.locator(".message.user")).to_have_text(re.compile("Hello llama"))
    first = chat.finished_answer(0)
    assert first.strip()
    assert len(page.evaluate("[...window.seenLengths]")) > 1, "the answer arrived in one piece, not streamed"
    sent = chat.requests[0]
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 12
    assert sent["messages"] == [{"role": "user", "content": "Hello llama"}]
    assert first == reference(live_server.url, sent)
    stats = chat.answers().nth(0).locator(".stats")
    expect(stats).to_have_text(re.compile(r"^12 tokens · \d+(\.\d)? tok/s · first token [\d.]+ s · hit max tokens$"))
    assert float(stats.get_attribute("data-tokens-per-second")) > 0

    chat.say("Tell me more")
    second = chat.finished_answer(1)
    assert second.strip()
    assert chat.requests[1]["messages"] == [
        {"role": "user", "content": "Hello llama"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Tell me more"},
    ]
    assert second == reference(live_server.url, chat.requests[1])
    expect(page.locator(".message")).to_have_count(4)


def test_copy_answer(page, live_server) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.url)
    chat = Chat(page, live_server.url)
    chat.settings(temperature="0", max_tokens="8")
    chat.say("Copy this")
    answer = chat.finished_answer(0)
    chat.answers().nth(0).get_by_role("button", name="Copy").click()
    expect(chat.answers().nth(0).get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == answer


def test_system_prompt_and_new_chat(page, live_server) -> None:
    chat = Chat(page, live_server.url)
    chat.settings(temperature="0", max_tokens="10", system="You are a terse llama.")
    chat.say("Who are you?")
    answer = chat.finished_answer(0)
    assert chat.requests[0]["messages"] == [
        {"role": "system", "content": "You are a terse llama."},
        {"role": "user", "content": "Who are you?"},
    ]
    assert answer == reference(live_server.url, chat.requests[0])

    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    chat.settings(temperature=None, max_tokens=None, system="Answer in rhymes.")
    chat.say("Fresh start")
    chat.finished_answer(0)
    assert chat.requests[1]["messages"] == [
        {"role": "system", "content": "Answer in rhymes."},
        {"role": "user", "content": "Fresh start"},
    ]


def test_the_sampling_defaults_are_those_of_llamaforge_chat(page, live_server) -> None:
    """Meta's chat defaults, as `llamaforge chat` has them, not /v1's temperature 1.0."""
    from llamaforge.cli import build_parser

    chat = Chat(page, live_server.url)
    chat.settings(max_tokens="4")
    chat.say("Hello")
    chat.finished_answer(0)
    defaults = build_parser().parse_args(["chat"])
    assert (chat.requests[0]["temperature"], chat.requests[0]["top_p"]) == (defaults.temperature, defaults.top_p)


def test_server_error_is_shown_and_the_turn_left_out(page, live_server) -> None:
    chat = Chat(page, live_server.url)
    chat.settings(temperature="0", max_tokens="6")
    chat.say("What does [INST] mean?")
    error = page.get_by_role("alert")
    expect(error).to_be_visible()
    server = httpx.post(f"{live_server.url}/v1/chat/completions", json=chat.requests[0], timeout=30)
    assert server.status_code == 400
    message = server.json()["error"]["message"]
    assert "[INST]" in message
    expect(error).to_contain_text(message)
    expect(error).to_contain_text("HTTP 400")
    expect(chat.answers()).to_have_count(0)
    # The refused text comes back to the box to edit; the next message is sent without it.
    expect(page.get_by_label("Message", exact=True)).to_have_value("What does [INST] mean?")
    chat.say("What does a llama eat?")
    chat.finished_answer(0)
    assert chat.requests[1]["messages"] == [{"role": "user", "content": "What does a llama eat?"}]


def test_stop_aborts_a_long_answer_and_frees_the_slot(page, live_server, slow_engine, monkeypatch) -> None:
    # The random model samples EOS now and then (first, for 1 seed in 300): here no answer may end by itself.
    monkeypatch.setattr(slow_engine, "eos_id", -1)
    chat = Chat(page, live_server.url)
    chat.settings(temperature="1", max_tokens="")  # no limit: the answer may fill the model's context
    chat.say("Tell me a very long story")
    content = chat.answers().nth(0).locator(".content")
    expect(content).not_to_have_text("")
    expect(chat.answers().nth(0).get_by_role("button", name="Copy")).to_be_hidden()  # no stats until it ends
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_visible()
    stop.click()
    expect(chat.answers().nth(0).locator(".stats")).to_contain_text("stopped")
    length = len(content.text_content())
    assert "max_tokens" not in chat.requests[0]
    deadline = time.monotonic() + 5
    while slow_engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow_engine.stats().running == 0, "the engine still runs the stopped request"
    time.sleep(0.5)
    assert len(content.text_content()) == length
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    expect(stop).to_be_hidden()


def test_phone_width_has_no_horizontal_scroll(browser, live_server) -> None:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        chat = Chat(page, live_server.url)
        expect(page.locator("#model-name")).to_have_text("tiny")
        assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        chat.settings(temperature="0", max_tokens="12")
        chat.say("Too long for the tiny context: " + "x" * 300)  # long bubbles and a long error
        expect(page.get_by_role("alert")).to_contain_text("context")
        page.get_by_label("Message", exact=True).fill("")
        chat.say("A long unbroken word: " + "y" * 60)
        chat.finished_answer(0)
        assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        for name in ("Send", "New chat"):
            box = page.get_by_role("button", name=name).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    finally:
        context.close()


def test_api_key_is_asked_for_and_kept(browser, tiny_llm) -> None:
    with serve(tiny_llm, api_key="sekret", model_name="locked") as server:
        context = browser.new_context(viewport=DESKTOP)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        try:
            prompts: list[str] = []

            def answer_prompt(dialog) -> None:
                prompts.append(dialog.message)
                dialog.accept("sekret")

            page.on("dialog", answer_prompt)
            chat = Chat(page, server.url)
            expect(page.locator("#model-name")).to_contain_text("API key")
            chat.settings(temperature="0", max_tokens="5")
            chat.say("Let me in")
            assert chat.finished_answer(0).strip()
            assert len(prompts) == 1 and "API key" in prompts[0]
            expect(page.locator("#model-name")).to_have_text("locked")
            assert page.evaluate("localStorage.getItem('llamaforge.apiKey')") == "sekret"

            page.reload()  # the key is remembered: no prompt this time
            expect(page.locator("#model-name")).to_have_text("locked")
            chat.settings(temperature="0", max_tokens="5")
            chat.say("Again")
            chat.finished_answer(0)
            assert len(prompts) == 1
            assert chat.requests[-1]["messages"] == [{"role": "user", "content": "Again"}]
        finally:
            context.close()


def test_two_models_side_by_side(browser, tiny_model_dir: Path, tiny_config, tmp_path: Path) -> None:
    """Compare the base and an adapter on one conversation: both columns stream, each answers as the server does
    for its own model and history, and the page still draws (a screenshot)."""
    from factories import write_adapter

    import llamaforge
    from llamaforge.adapters import AdapterStack

    llm = llamaforge.load(tiny_model_dir)
    llm.adapters = AdapterStack(llm.model, max_adapters=1, max_rank=8)
    llm.adapters.add("colors", write_adapter(tmp_path / "colors", tiny_config, 1, 8, ("q_proj", "v_proj", "o_proj")))
    target = tmp_path / "compare.png"
    with serve(llm, model_name="tiny") as server, new_page(browser, {"width": 1100, "height": 700}) as page:
        chat = Chat(page, server.url)
        expect(page.locator("#model-a option")).to_have_count(2)
        chat.settings(temperature="0", max_tokens="12")
        page.get_by_label("Compare side by side").check()
        page.locator("#model-b").select_option("colors")
        page.locator("#temperature-b").fill("0")
        expect(page.locator("#model-name")).to_have_text("tiny | colors")
        for turn, text in enumerate(["Name a color.", "And another one?"]):
            chat.say(text)
            pair = page.locator(".pair").nth(turn)
            for side in ("a", "b"):
                expect(pair.locator(f".message[data-side={side}] .stats")).to_be_visible()
            left, right = chat.requests[2 * turn:2 * turn + 2]
            assert (left["model"], right["model"]) == ("tiny", "colors")
            answers = [pair.locator(f".message[data-side={side}] .content").text_content() for side in "ab"]
            assert answers == [reference(server.url, left), reference(server.url, right)]
            assert answers[0] != answers[1]
            if turn == 1:  # each column sent its own earlier answer
                assert left["messages"][1]["content"] != right["messages"][1]["content"]
        page.screenshot(path=str(target))
    assert target.stat().st_size > 0


def test_screenshot(browser, assets, tmp_path) -> None:
    """A conversation with stories260K at desktop size; written to docs/ only when asked (see the docstring)."""
    import llamaforge

    llm = llamaforge.load(assets / "stories260K" / "stories260K.bin")
    target = Path(os.environ.get("LLAMAFORGE_SCREENSHOT") or tmp_path / "playground.png")
    with serve(llm, model_name="stories260K") as server, new_page(browser, {"width": 1100, "height": 640}) as page:
        chat = Chat(page, server.url)
        expect(page.locator("#model-name")).to_have_text("stories260K")
        chat.settings(temperature="0", max_tokens="60", system="You tell short stories for children.")
        chat.say("Once upon a time, a little llama")
        assert chat.finished_answer(0).strip()
        chat.say("What happened next?")
        assert chat.finished_answer(1).strip()
        page.get_by_label("Message", exact=True).fill("Tell me about the llama's friend")
        page.screenshot(path=str(target))
    assert target.stat().st_size > 0
