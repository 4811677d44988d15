"""The engine's prefix cache: reused keys and values change no output, are the right ones, and are evicted LRU."""

from __future__ import annotations

import threading

import pytest
import torch
from factories import submit_all

from llamaforge.api import LLM
from llamaforge.engine import Engine, EngineRequest
from llamaforge.kv_blocks import root_key
from llamaforge.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    """Submit all prompts at once; each one's generated ids."""
    return submit_all(engine, prompts, params, timeout=120)


def chat(engine: Engine, turns: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """A conversation turn by turn (each prompt = the history, its answer, the next message); the answers, and the
    prefix-cache hits each turn added."""
    history: list[int] = []
    answers, hits = [], []
    for message in turns:
        before = engine.stats().prefix_cache_hits
        prompt = history + message
        answer = run(engine, [prompt])[0]
        answers.append(answer)
        hits.append(engine.stats().prefix_cache_hits - before)
        history = prompt + answer
    return answers, hits


@pytest.fixture
def turns(tiny_llm: LLM) -> list[list[int]]:
    encode = tiny_llm.tokenizer.encode
    return [encode("The llama hums", bos=True)] + [encode(f"Then {i}?", bos=False) for i in range(1, 5)]


def test_a_chat_reuses_its_history_and_answers_as_without_the_cache(tiny_llm: LLM, turns: list[list[int]]) -> None:
    cached = Engine(tiny_llm, max_batch_size=2, prefill_chunk=8).start()
    plain = Engine(tiny_llm, max_batch_size=2, prefill_chunk=8, prefix_cache=False).start()
    try:
        answers, hits = chat(cached, turns)
        plain_answers, plain_hits = chat(plain, turns)
    finally:
        cached.stop()
        plain.stop()
    assert answers == plain_answers
    assert plain_hits == [0] * len(turns) and plain.stats().prefix_cache_queries == 0
    # Each later turn reuses the whole history but the previous answer's last token, which was never fed.
    history = 0
    for turn, (message, answer, hit) in enumerate(zip(turns, answers, hits, strict=True)):
        assert hit == (0 if turn == 0 else history - 1)
        history += len(message) + len(answer)
    stats = cached.stats()
    assert stats.prompt_tokens + stats.prefix_cache_hits == stats.prefix_cache_queries
    assert stats.prefix_cache_hit_rate > 0.5


@pytest.mark.parametrize("quantize", ["int4", None], ids=["int4", "bfloat16-batch-invariant"])
def test_a_chat_gets_the_same_log_probabilities_with_and_without_the_cache(tiny_model_dir, quantize) -> None:
    """An int4 model with bfloat16 activations (where another order of sums shows), and a bfloat16 one loaded
    batch-invariant: each answer's tokens and log-probabilities to the bit, though the cached engine prefills only
    each turn's new tokens in one chunk and the plain one the whole history in chunks of 24 (the kernels compute each
    row and query alike however it is split). Also concurrent prompts sharing a start, whose cached suffixes are
    prefilled beside other rows. (At this model's width torch's GEMM happens to agree with the kernel too; the
    bfloat16 case that differs without the mode is test_quantize_int's 2048-wide layer.)"""
    import llamaforge
    from llamaforge.quantize import kernels

    if kernels.native_decode() is None:
        pytest.skip("the int8 / int4 and attention kernels need AVX-512 (VNNI, BF16) or AVX2 and a C compiler")
    llm = llamaforge.load(tiny_model_dir, dtype="bfloat16", quantize=quantize, batch_invariant=True)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)
    encode = llm.tokenizer.encode
    words = "The llama hums over the hills"
    turns = [encode(words, bos=True)] + [encode(f" {words} {i} times?", bos=False) for i in range(1, 4)]
    assert len(turns[0]) > 16 and sum(map(len, turns)) + 6 * len(turns) <= llm.config.max_seq_len

    def answer(engine: Engine, prompts: list[list[int]]) -> list[list[tuple]]:
        events: list[list[tuple]] = [[] for _ in prompts]
        done = threading.Semaphore(0)
        for index, prompt in enumerate(prompts):
            def emit(event, index=index) -> None:
                assert not isinstance(event, BaseException), event
                events[index].append((event.token_id, event.logprob, event.top_logprobs))
                if event.finish_reason:
                    done.release()
            engine.submit(EngineRequest(prompt, params, emit))
        for _ in prompts:
            assert done.acquire(timeout=120)
        return events

    def conversation(engine: Engine) -> list[list[tuple]]:
        history, answers = [], []
        for message in turns:
            answers.append(answer(engine, [history + message])[0])
            history = history + message + [token for token, _, _ in answers[-1]]
        shared = history[:40]
        return answers + answer(engine, [shared + encode(f" Question {i}?", bos=False) for i in range(4)])

    cached = Engine(llm, max_batch_size=3, prefill_chunk=24).start()
    plain = Engine(llm, max_batch_size=3, prefill_chunk=24, prefix_cache=False).start()
    try:
        with_cache, without = conversation(cached), conversation(plain)
    finally:
        cached.stop()
        plain.stop()
    assert cached.stats().prefix_cache_hits > 100
    assert with_cache == without


def test_concurrent_requests_share_a_long_prefix_and_answer_as_without_it(tiny_llm: LLM) -> None:
    """Requests with one system prompt, arriving together: the later ones copy it from a running slot."""
    encode = tiny_llm.tokenizer.encode
    system = encode("You are a helpful llama. " * 4 + "Answer briefly.", bos=True)
    prompts = [system + encode(f" Question {i}: what is {i} plus {i}?", bos=False) for i in range(6)]
    prompts.append(encode("An unrelated prompt", bos=True))
    cached = Engine(tiny_llm, max_batch_size=3, prefill_chunk=8).start()
    plain = Engine(tiny_llm, max_batch_size=3, prefill_chunk=8, prefix_cache=False).start()
    try:
        results = run(cached, prompts)
        expected = run(plain, prompts)
    finally:
        cached.stop()
        plain.stop()
    assert results == expected
    assert results[:6] == [tiny_llm.generate(p, params=GREEDY).token_ids for p in prompts[:6]]
    # The first request computes the system prompt; the other five find it in a slot (running or kept).
    assert cached.stats().prefix_cache_hits >= 5 * len(system)


def test_cached_blocks_hold_the_keys_and_values_of_their_tokens(tiny_llm: LLM) -> None:
    """After mixed traffic (batched steps, padding, shared and copied blocks, evictions), every block the prefix
    cache keeps holds exactly what a fresh forward of the tokens up to its end computes at its positions."""
    encode = tiny_llm.tokenizer.encode
    prompts = [encode(f"Story {i}: " + "the llama walks " * (i % 4 + 1), bos=True) for i in range(9)]
    params = SamplingParams(max_new_tokens=9, temperature=0.8, seed=3)
    engine = Engine(tiny_llm, max_batch_size=4, prefill_chunk=5, block_len=4, kv_cache_tokens=160).start()
    try:
        run(engine, prompts, params)
        run(engine, prompts[:2], GREEDY)
    finally:
        engine.stop()
    pool, model = engine.blocks, tiny_llm.model
    assert pool.used == 0 and pool.reserved == 0
    checked = 0
    for block, entry in pool.cached.items():
        before: list[int] = []  # the tokens of the blocks it follows, if they are still cached
        parent = entry.parent
        while parent in pool.by_key:
            before = list(pool.cached[pool.by_key[parent]].tokens) + before
            parent = pool.cached[pool.by_key[parent]].parent
        if parent != root_key(0):
            continue  # a block whose chain start was evicted: unreachable until it is computed again
        tokens = before + list(entry.tokens)
        fresh = model.new_kv_cache(1, len(tokens))
        with torch.inference_mode():
            model(torch.tensor([tokens]), torch.arange(len(tokens))[None], fresh, kv_len=len(tokens))
        for layer, reference in zip(engine.kv_pool, fresh, strict=True):
            n = len(entry.tokens)
            torch.testing.assert_close(layer.k[block, :, :n], reference.k[0, :, len(before):])
            torch.testing.assert_close(layer.v[block, :, :n], reference.v[0, :, len(before):])
        checked += 1
    assert checked >= 20


def test_the_least_recently_used_conversation_is_evicted_first(tiny_llm: LLM) -> None:
    """A pool that holds two conversations: the third one's blocks come from the least recently used one."""
    encode = tiny_llm.tokenizer.encode
    a, b, c = (encode(f"Conversation {name} is about " + topic, bos=True)
               for name, topic in (("A", "rivers"), ("B", "mountains and snow"), ("C", "the sea")))
    new = GREEDY.max_new_tokens
    room = sum(-(-(len(p) + new) // 4) * 4 for p in (a, b))  # the blocks of 4 that A and B each take
    engine = Engine(tiny_llm, max_batch_size=2, prefill_chunk=16, block_len=4, kv_cache_tokens=room).start()
    try:
        answer_a, answer_b, _ = (run(engine, [p])[0] for p in (a, b, c))  # C takes A's blocks, least recently used
        before = engine.stats().prefix_cache_hits
        run(engine, [b + answer_b + encode("And then?", bos=False)])
        reused_b = engine.stats().prefix_cache_hits - before
        run(engine, [a + answer_a + encode("And then?", bos=False)])
        reused_a = engine.stats().prefix_cache_hits - before - reused_b
    finally:
        engine.stop()
    assert reused_b == len(b) + len(answer_b) - 1
    assert reused_a < len(encode("Conversation A", bos=True))  # at most the start every prompt here shares


def test_the_pool_keeps_more_conversations_than_sequences(tiny_llm: LLM) -> None:
    """One sequence at a time, three users taking turns: each user's next turn reuses all of its history (the pool
    keeps every conversation), and answers as without the cache."""
    encode = tiny_llm.tokenizer.encode
    users = [encode(f"User {name} asks about " + topic, bos=True)
             for name, topic in (("A", "rivers"), ("B", "snow on mountains"), ("C", "the sea"))]
    cached = Engine(tiny_llm, max_batch_size=1, block_len=4, kv_cache_tokens=256).start()
    plain = Engine(tiny_llm, max_batch_size=1, prefix_cache=False).start()
    try:
        histories = {engine: list(users) for engine in (cached, plain)}
        hits = []
        for turn in range(3):
            for user in range(len(users)):
                for engine in (cached, plain):
                    before = engine.stats().prefix_cache_hits
                    prompt = histories[engine][user] + (encode(f" And {turn}?", bos=False) if turn else [])
                    answer = run(engine, [prompt])[0]
                    histories[engine][user] = prompt + answer
                    if engine is cached:
                        hits.append((engine.stats().prefix_cache_hits - before, len(prompt)))
    finally:
        cached.stop()
        plain.stop()
    assert histories[cached] == histories[plain]
    history = [len(p) + GREEDY.max_new_tokens for p in users]  # tokens of each conversation so far
    for turn in range(1, 3):  # every later turn: the whole history but the last answer's last token
        for user in range(len(users)):
            hit, length = hits[turn * len(users) + user]
            assert hit == history[user] - 1
            history[user] = length + GREEDY.max_new_tokens
    assert cached.stats().kv_blocks_used == 0 and cached.stats().cached_tokens >= max(history)


def test_requests_wait_for_kv_blocks_and_all_finish(tiny_llm: LLM) -> None:
    """A pool that holds one request at a time, four sequence slots: the others wait in the queue (none fails), and
    each answers as alone."""
    encode = tiny_llm.tokenizer.encode
    prompts = [encode(f"Waiting prompt number {i}", bos=True) for i in range(3)]
    room = max(len(p) for p in prompts) + GREEDY.max_new_tokens
    engine = Engine(tiny_llm, max_batch_size=4, block_len=4, kv_cache_tokens=room, prefix_cache=False).start()
    try:
        assert run(engine, prompts) == [tiny_llm.generate(p, params=GREEDY).token_ids for p in prompts]
    finally:
        engine.stop()
    stats = engine.stats()
    assert stats.peak_running == 1 and stats.kv_blocks_used == 0 and stats.free_slots == 4


def test_a_request_larger_than_the_pool_is_refused_with_the_fix(tiny_llm: LLM) -> None:
    from llamaforge.errors import GenerationError

    engine = Engine(tiny_llm, max_batch_size=2, kv_cache_tokens=32)
    with pytest.raises(GenerationError, match=r"need 40 positions of KV cache, more than the server's 32; ask for "
                                              r"fewer tokens, or raise --kv-cache-tokens"):
        engine.submit(EngineRequest([1] * 30, SamplingParams(max_new_tokens=10), lambda event: None))


def test_a_failed_request_leaves_nothing_in_the_cache(tiny_llm: LLM) -> None:
    engine = Engine(tiny_llm, max_batch_size=1).start()
    failed = threading.Event()
    prompt = tiny_llm.tokenizer.encode("A request whose client breaks", bos=True)

    def broken(event) -> None:
        if isinstance(event, BaseException):
            failed.set()
            return
        raise RuntimeError("the client's callback broke")

    try:
        engine.submit(EngineRequest(prompt, GREEDY, broken))
        assert failed.wait(60)
        assert engine.stats().cached_tokens == 0 and engine.stats().kv_blocks_used == 0
        before = engine.stats().prefix_cache_hits
        assert run(engine, [prompt]) == [tiny_llm.generate(prompt, params=GREEDY).token_ids]
        assert engine.stats().prefix_cache_hits == before
    finally:
        engine.stop()


def test_a_served_chat_reuses_its_history_and_metrics_say_so(live_server) -> None:
    """Two turns of a chat through the OpenAI client: the second turn's prompt starts with the first turn's history,
    which the server does not compute again; /metrics counts it."""
    openai = pytest.importorskip("openai")
    import httpx

    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="none")
    engine = live_server.engine
    messages = [{"role": "user", "content": "Tell me about llamas and their hills."}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    before = engine.stats().prefix_cache_hits
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the rivers?"}]
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    reused = engine.stats().prefix_cache_hits - before
    assert reused >= first.usage.prompt_tokens  # at least the whole first prompt came from the cache
    assert reused < second.usage.prompt_tokens
    text = httpx.get(f"{live_server.url}/metrics").text
    stats = engine.stats()
    assert f"llamaforge_prefix_cache_hits {float(stats.prefix_cache_hits)}" in text
    assert f"llamaforge_prefix_cache_queries {float(stats.prefix_cache_queries)}" in text
