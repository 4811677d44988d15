// llamaforge playground: a chat page over the server's own OpenAI route (/v1/chat/completions).
// Plain JavaScript, no build step, no network access beyond this server.
"use strict";

(() => {
  const KEY_STORAGE = "llamaforge.apiKey";
  const $ = (id) => document.getElementById(id);
  const els = {
    modelName: $("model-name"),
    modelA: $("model-a"),
    modelB: $("model-b"),
    compare: $("compare"),
    compareSettings: $("compare-settings"),
    temperatureB: $("temperature-b"),
    temperatureBValue: $("temperature-b-value"),
    newChat: $("new-chat"),
    settings: $("settings"),
    system: $("system"),
    temperature: $("temperature"),
    temperatureValue: $("temperature-value"),
    topP: $("top-p"),
    topPValue: $("top-p-value"),
    maxTokens: $("max-tokens"),
    apiKey: $("api-key"),
    log: $("log"),
    empty: $("empty"),
    form: $("composer"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
    template: $("message-template"),
  };

  // The conversation as each column sends it: user and assistant turns, alternating (the system prompt is added
  // at send time from its box). Side by side, both columns get the same user turns and keep their own answers.
  // A user turn joins a column's history only once that column has answered it.
  let histories = { a: [], b: [] };
  let controller = null; // the AbortController of the answers being streamed

  // --- small helpers ----------------------------------------------------------------------------

  function storageGet(key) {
    try { return window.localStorage.getItem(key) || ""; } catch { return ""; }
  }

  function storageSet(key, value) {
    try {
      if (value) window.localStorage.setItem(key, value);
      else window.localStorage.removeItem(key);
    } catch { /* storage disabled: the key lives for this page only */ }
  }

  function headers() {
    const result = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) result.Authorization = `Bearer ${key}`;
    return result;
  }

  function nearBottom() {
    const box = scroller();
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  function scroller() {
    // On wide screens the log scrolls by itself; on phones the whole page scrolls.
    return els.log.scrollHeight > els.log.clientHeight + 1 ? els.log : document.scrollingElement;
  }

  function scrollToEnd() {
    const box = scroller();
    box.scrollTop = box.scrollHeight;
  }

  function format(number, digits) {
    return Number.isFinite(number) ? number.toFixed(digits) : "–";
  }

  // The error message of a failed response: OpenAI's {"error": {"message"}}, TGI's {"error": "..."}, or the text.
  async function errorMessage(response) {
    const text = await response.text().catch(() => "");
    let message = text.trim();
    try {
      const body = JSON.parse(text);
      const error = body && body.error;
      message = (error && (error.message || (typeof error === "string" ? error : ""))) || body.detail || message;
    } catch { /* not JSON: keep the text */ }
    return `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}: ${message || "no details"}`;
  }

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // --- messages in the log ----------------------------------------------------------------------

  function addMessage(role, text) {
    els.empty.hidden = true;
    const node = els.template.content.firstElementChild.cloneNode(true);
    node.classList.add(role);
    node.dataset.role = role;
    node.querySelector(".role").textContent = { user: "You", assistant: "Assistant", error: "Error", notice: "Note" }[role];
    node.querySelector(".content").textContent = text;
    if (role === "error") node.setAttribute("role", "alert");
    if (role !== "assistant") node.querySelector(".meta").remove();
    const follow = nearBottom();
    els.log.append(node);
    if (follow || role !== "assistant") scrollToEnd();
    return node;
  }

  function showError(text) {
    return addMessage("error", text);
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        return true;
      } catch { /* fall back below */ }
    }
    // Plain-http pages (a server on the LAN) have no clipboard API: the old way still works there.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    area.remove();
    return ok;
  }

  els.log.addEventListener("click", async (event) => {
    const button = event.target.closest("button.copy");
    if (!button) return;
    const text = button.closest(".message").querySelector(".content").textContent;
    const ok = await copyText(text);
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });

  // --- the model name ---------------------------------------------------------------------------

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (response.status === 401) {
        els.modelName.textContent = "unknown (the server needs an API key: see Settings)";
        return;
      }
      if (!response.ok) throw new Error(await errorMessage(response));
      const body = await response.json();
      const ids = (body.data || []).map((model) => model.id);
      for (const select of [els.modelA, els.modelB]) {
        const chosen = select.value;
        select.replaceChildren(...ids.map((id) => new Option(id, id)));
        if (ids.includes(chosen)) select.value = chosen;
      }
      if (ids.length > 1 && !els.modelB.dataset.touched) els.modelB.value = ids[1];
      showModels();
    } catch (error) {
      els.modelName.textContent = `unavailable (${error.message})`;
    }
  }

  function showModels() {
    const a = els.modelA.value || "unknown";
    els.modelName.textContent = els.compare.checked ? `${a} | ${els.modelB.value || "unknown"}` : a;
  }

  // The columns a message goes to: the left one (model A, the main settings), and the right one when comparing.
  function sides() {
    const left = { id: "a", model: els.modelA.value, temperature: Number(els.temperature.value) };
    if (!els.compare.checked) return [left];
    return [left, { id: "b", model: els.modelB.value, temperature: Number(els.temperatureB.value) }];
  }

  // --- sending and streaming --------------------------------------------------------------------

  function requestBody(messages, side) {
    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: side.temperature,
      top_p: Number(els.topP.value),
    };
    if (side.model) body.model = side.model;
    const maxTokens = parseInt(els.maxTokens.value, 10);
    if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  // Server-sent events from a fetch body: calls onData with each event's data (the lines after "data:").
  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      buffer = buffer.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) !== -1) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data && onData(data) === false) {
          await reader.cancel().catch(() => {});
          return;
        }
      }
      if (done) return;
    }
  }

  async function post(messages, side, signal) {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody(messages, side)),
      signal,
    });
    if (!response.ok) throw new HttpError(response.status, await errorMessage(response));
    return response;
  }

  // A response, asking once for an API key if the server wants one.
  async function postWithKey(messages, side, signal) {
    try {
      return await post(messages, side, signal);
    } catch (error) {
      if (!(error instanceof HttpError && error.status === 401)) throw error;
      const key = window.prompt("The server needs an API key (sent as a Bearer token). API key:", els.apiKey.value);
      if (!key) throw error;
      els.apiKey.value = key.trim();
      storageSet(KEY_STORAGE, els.apiKey.value);
      loadModel();
      return post(messages, side, signal);
    }
  }

  function setBusy(busy) {
    els.send.hidden = busy;
    els.stop.hidden = !busy;
  }

  async function send(text) {
    const userTurn = { role: "user", content: text };
    const columns = sides();
    const system = els.system.value.trim();

    const userNode = addMessage("user", text);
    const answerNodes = columns.map(() => addMessage("assistant", ""));
    if (columns.length > 1) {
      // Side by side: the two answers in one row, each labelled with what produced it.
      const pair = document.createElement("div");
      pair.className = "pair";
      answerNodes[0].before(pair);
      pair.append(...answerNodes);
      answerNodes.forEach((node, index) => {
        const label = document.createElement("p");
        label.className = "label muted";
        label.textContent = `${columns[index].model} · temperature ${columns[index].temperature}`;
        node.querySelector(".role").after(label);
        node.dataset.side = columns[index].id;
      });
    }

    controller = new AbortController();
    const signal = controller.signal;
    setBusy(true);
    const results = await Promise.all(columns.map((side, index) => {
      const messages = [...histories[side.id], userTurn];
      if (system) messages.unshift({ role: "system", content: system });
      return stream(messages, side, answerNodes[index], signal);
    }));
    controller = null;
    setBusy(false);
    if (!userNode.isConnected) return; // "New chat" was pressed while the answers streamed

    const failures = results.filter((result) => result.failure !== null);
    const kept = results.filter((result) => result.failure === null && (result.answer || !result.stopped));
    if (!kept.length) {
      // No column answered: keep the turn out of the histories so the next message is not refused again.
      userNode.classList.add("failed");
      if (!failures.length) addMessage("notice", "Stopped before the first token; the message was not kept.");
      if (!els.input.value) els.input.value = text;
    }
    for (const result of failures) showError(result.failure);
    columns.forEach((side, index) => {
      const result = results[index];
      if (result.failure === null && (result.answer || !result.stopped)) {
        histories[side.id] = [...histories[side.id], userTurn, { role: "assistant", content: result.answer }];
      }
    });
  }

  // Stream one column's answer into its node; {answer, failure (null or why), stopped}.
  async function stream(messages, side, answerNode, signal) {
    const content = answerNode.querySelector(".content");
    const meta = answerNode.querySelector(".meta");
    const stats = answerNode.querySelector(".stats");
    answerNode.setAttribute("aria-busy", "true");

    let answer = "";
    let chunks = 0; // chunks that carried text: a fallback count of tokens when usage never comes
    let usage = null;
    let finishReason = null;
    let firstAt = null;
    const startedAt = performance.now();
    let failure = null;

    try {
      const response = await postWithKey(messages, side, signal);
      await readEvents(response, (data) => {
        if (data === "[DONE]") return false;
        let payload;
        try { payload = JSON.parse(data); } catch { return true; }
        if (payload.error) {
          failure = payload.error.message || JSON.stringify(payload.error);
          return false;
        }
        if (payload.usage) usage = payload.usage;
        const choice = payload.choices && payload.choices[0];
        if (!choice) return true;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (firstAt === null) firstAt = performance.now();
          chunks += 1;
          answer += piece;
          const follow = nearBottom();
          content.textContent = answer;
          if (follow) scrollToEnd();
        }
        if (choice.finish_reason) finishReason = choice.finish_reason;
        return true;
      });
    } catch (error) {
      if (error.name !== "AbortError") failure = error instanceof HttpError ? error.message : `Network error: ${error.message}`;
    }
    const endedAt = performance.now();
    const stopped = signal.aborted;
    answerNode.removeAttribute("aria-busy");
    if (failure !== null || (!answer && stopped)) {
      if (!answer) answerNode.remove();
      return { answer, failure, stopped };
    }

    answerNode.dataset.finishReason = stopped ? "stopped" : (finishReason || "");
    // Tokens per second: tokens after the first over the time from the first token to the end (the first
    // token's time is the prompt's prefill, shown apart as time to first token).
    const tokens = usage && !stopped ? usage.completion_tokens : chunks;
    const seconds = firstAt === null ? NaN : (endedAt - firstAt) / 1000;
    const rate = tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : NaN;
    const parts = [
      `${tokens} token${tokens === 1 ? "" : "s"}`,
      `${format(rate, 1)} tok/s`,
      `first token ${format(firstAt === null ? NaN : (firstAt - startedAt) / 1000, 2)} s`,
    ];
    if (stopped) parts.push("stopped");
    else if (finishReason === "length") parts.push("hit max tokens");
    stats.textContent = parts.join(" · ");
    stats.dataset.tokensPerSecond = Number.isFinite(rate) ? rate.toFixed(3) : "";
    meta.hidden = false;
    return { answer, failure: null, stopped };
  }

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (controller) return;
    const text = els.input.value;
    if (!text.trim()) return;
    els.input.value = "";
    send(text);
  });

  els.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey) {
      event.preventDefault();
      els.form.requestSubmit();
    }
  });

  els.stop.addEventListener("click", () => {
    if (controller) controller.abort();
    els.input.focus();
  });

  els.newChat.addEventListener("click", () => {
    if (controller) controller.abort();
    histories = { a: [], b: [] };
    for (const node of els.log.querySelectorAll(".message, .pair")) node.remove();
    els.empty.hidden = false;
    els.input.focus();
  });

  // --- settings ---------------------------------------------------------------------------------

  function showValue(input, output) {
    const update = () => { output.textContent = Number(input.value).toString(); };
    input.addEventListener("input", update);
    input.addEventListener("change", update);
    update();
  }

  showValue(els.temperature, els.temperatureValue);
  showValue(els.topP, els.topPValue);
  showValue(els.temperatureB, els.temperatureBValue);

  els.compare.addEventListener("change", () => {
    els.compareSettings.hidden = !els.compare.checked;
    // The right column starts from the conversation as the left one has it.
    if (els.compare.checked) histories.b = [...histories.a];
    showModels();
  });
  els.modelA.addEventListener("change", showModels);
  els.modelB.addEventListener("change", () => { els.modelB.dataset.touched = "1"; showModels(); });

  els.apiKey.value = storageGet(KEY_STORAGE);
  els.apiKey.addEventListener("change", () => {
    els.apiKey.value = els.apiKey.value.trim();
    storageSet(KEY_STORAGE, els.apiKey.value);
    loadModel();
  });

  if (window.matchMedia("(min-width: 800px)").matches) els.settings.open = true;

  loadModel();
  els.input.focus();
})();
