"""The fused decode layers (decode_layers.c): one C call a step, bit for bit the layer-by-layer forward."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
from factories import q4_k_bytes, q6_k_bytes, random_model, write_adapter

import llamaforge
from llamaforge.adapters import PROJECTIONS, AdapterStack
from llamaforge.config import ModelArgs
from llamaforge.generate import Decoder
from llamaforge.model import KVCache, rms_norm, swiglu
from llamaforge.quantize import QuantizedLinear, kernels, quantize_model, use_bf16_kernel, use_fused_decode
from llamaforge.quantize.formats import from_gguf_q4_k, from_gguf_q5_k, from_gguf_q6_k
from llamaforge.quantize.fused import fits_fused_decode

pytestmark = pytest.mark.skipif(kernels.native_decode() is None,
                                reason="the fused decode layers need AVX-512 (VNNI, BF16) or AVX2 and a C compiler")

# Grouped-query attention; an FFN width that int4's groups do not divide (down_proj stays int8 beside int4
# layers) and that is not a multiple of 32; a vocabulary that is not a multiple of 16 rows.
CONFIG = ModelArgs(dim=256, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=688, vocab_size=300, max_seq_len=128)


def quantized_model(mode: str, group_size: int | None = None) -> torch.nn.Module:
    """The test model in bfloat16, its linears quantized to `mode` ("bf16": left in bfloat16; "mixed": a schemes
    mix as a Q4_K_M GGUF loads, q / k / gate Q4_K beside a Q6_K v and int4 up, a Q5_K o, int8 down), as load()
    sets it up."""
    model = random_model(CONFIG, seed=3).to(torch.bfloat16).eval()
    if mode == "mixed":
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for owner, name in ((attention, "q_proj"), (attention, "k_proj"), (mlp, "gate_proj")):
                weight = getattr(owner, name).weight.float()
                setattr(owner, name, QuantizedLinear(from_gguf_q4_k(q4_k_bytes(weight), tuple(weight.shape))))
            weight = attention.v_proj.weight.float()
            attention.v_proj = QuantizedLinear(from_gguf_q6_k(q6_k_bytes(weight), tuple(weight.shape)))
            mlp.down_proj = QuantizedLinear.from_linear(mlp.down_proj, 8, 32)
            weight = attention.o_proj.weight.float()
            attention.o_proj = QuantizedLinear(from_gguf_q5_k(q4_k_bytes(weight, bits=5), tuple(weight.shape)))
            mlp.up_proj = QuantizedLinear.from_linear(mlp.up_proj, 4, 32)
    elif mode != "bf16":
        quantize_model(model, mode, group_size)
    use_bf16_kernel(model)
    return model


@pytest.mark.parametrize(("mode", "group_size"), [("int4", None), ("int8", None), ("int4", 64), ("bf16", None),
                                                 ("mixed", None)])
def test_fused_steps_equal_the_layered_forward(mode: str, group_size: int | None) -> None:
    model = quantized_model(mode, group_size)
    assert use_fused_decode(model)
    fused_cache, layered_cache = model.new_kv_cache(1, 64), model.new_kv_cache(1, 64)
    with torch.inference_mode():
        for position in range(40):
            token = torch.tensor([(position * 37 + 11) % CONFIG.vocab_size])
            fused = model.fused_decode(token, torch.tensor([position]), fused_cache)
            layered = model(token[:, None], torch.tensor([[position]]), layered_cache,
                            logits_at=torch.zeros(1, dtype=torch.long), kv_len=position + 1)
            assert torch.equal(fused, layered), f"position {position}"
    for fused_layer, layered_layer in zip(fused_cache, layered_cache, strict=True):
        assert torch.equal(fused_layer.k, layered_layer.k) and torch.equal(fused_layer.v, layered_layer.v)


@pytest.mark.parametrize("mode", ["int4", "bf16"])
def test_fused_steps_read_and_write_a_paged_cache_where_its_blocks_are(mode: str) -> None:
    """Two rows decoded through the fused layers with their positions in scattered blocks of a pool: the logits, and
    every position's keys and values, of the layer-by-layer forward over contiguous rows."""
    from llamaforge.model import BlockTable

    model = quantized_model(mode)
    assert use_fused_decode(model)
    blocks = [[6, 2, 9, 4, 1, 11, 3, 8], [5, 10, 7, 12, 13, 14, 15, 16]]
    pool = model.new_kv_pool(17, 4)
    paged = [layer.paged(BlockTable(torch.tensor(blocks), 4)) for layer in pool]
    contiguous = model.new_kv_cache(2, 32)
    with torch.inference_mode():
        for step in range(30):
            tokens = torch.tensor([(step * 37 + 11) % CONFIG.vocab_size, (step * 13 + 5) % CONFIG.vocab_size])
            positions = torch.tensor([step, step])
            fused = model.fused_decode(tokens, positions, paged)
            layered = model(tokens[:, None], positions[:, None], contiguous,
                            logits_at=torch.zeros(2, dtype=torch.long), kv_len=int(positions.max()) + 1)
            assert torch.equal(fused, layered), f"step {step}"
    for layer, reference in zip(paged, contiguous, strict=True):
        k, v = layer.read(32)
        assert torch.equal(k[:, :, :30], reference.k[:, :, :30]) and torch.equal(v[:, :, :30], reference.v[:, :, :30])


class Counting:
    """A model's fused decode, counting the steps it runs."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def takes(self, *args) -> bool:
        return self.inner.takes(*args)

    def __call__(self, *args) -> torch.Tensor:
        self.calls += 1
        return self.inner(*args)


def test_decoder_decodes_fused_where_the_model_has_it() -> None:
    model = quantized_model("int4")
    use_fused_decode(model)
    model.fused_decode = counting = Counting(model.fused_decode)
    decoder = Decoder(model, compile=False)
    with torch.inference_mode():
        decoder(torch.tensor([5]), torch.tensor([0]), model.new_kv_cache(1, 16), 1)
        decoder(torch.tensor([5, 6]), torch.tensor([0, 0]), model.new_kv_cache(2, 16), 1)
        assert counting.calls == 2
        decoder(torch.tensor([5, 6]), torch.tensor([0, 0]), model.new_kv_cache(3, 16), 1)  # rows != tokens
        assert counting.calls == 2


@pytest.mark.parametrize(("mode", "adapters"), [("int8", False), ("bf16", False), ("int4", True), ("bf16", True),
                                             ("mixed", True)])
def test_a_batch_of_rows_equals_each_row_alone_and_the_layered_forward(mode: str, adapters: bool,
                                                                       tmp_path: Path) -> None:
    """Rows at different positions (as the engine's slots are) get the numbers they get alone; with served LoRA
    adapters, rows on different adapters and the base too (the model wrapped after its fused path was built)."""
    model = quantized_model(mode)
    use_fused_decode(model)
    lengths, slots = [3, 17, 9, 1], [1, 0, 2, 1]
    with torch.inference_mode():
        model.fused_decode(torch.tensor([5]), torch.tensor([0]), model.new_kv_cache(1, 8))  # addresses built
    selection = None
    if adapters:
        stack = AdapterStack(model, max_adapters=2, max_rank=8)
        for slot, rank in ((1, 8), (2, 4)):
            stack.add(f"a{slot}", write_adapter(tmp_path / f"a{slot}", CONFIG, slot, rank,
                                                tuple(name.split(".")[-1] for name in PROJECTIONS)))
        selection = stack.selection

    def select(rows: list[int]) -> None:
        if selection is not None:
            selection.select(rows, "cpu")

    prompts = [[(7 * i + 3 * row) % CONFIG.vocab_size for i in range(n)] for row, n in enumerate(lengths)]
    batch_cache = model.new_kv_cache(len(lengths), 32)
    alone_caches = [model.new_kv_cache(1, 32) for _ in lengths]
    layered_cache = model.new_kv_cache(len(lengths), 32)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):  # prefill each row, layer by layer, into all three caches
            select([slots[row]])
            for cache in (batch_cache, layered_cache):
                model(torch.tensor([prompt]), torch.arange(len(prompt))[None],
                      [layer.rows(row, row + 1) for layer in cache], kv_len=len(prompt))
            model(torch.tensor([prompt]), torch.arange(len(prompt))[None], alone_caches[row], kv_len=len(prompt))
        tokens, positions = torch.tensor([11, 12, 13, 14]), torch.tensor(lengths)
        select(slots)
        assert model.fused_decode.takes(tokens, batch_cache)
        batch = model.fused_decode(tokens, positions, batch_cache)
        layered = model(tokens[:, None], positions[:, None], layered_cache, logits_at=torch.zeros(4, dtype=torch.long),
                        kv_len=max(lengths) + 1)
        alone = []
        for row in range(len(lengths)):
            select([slots[row]])
            alone.append(model.fused_decode(tokens[row:row + 1], positions[row:row + 1], alone_caches[row]))
        select([0] * len(lengths))  # the same caches, no adapter this step: the adapted rows' logits change
        base = model.fused_decode(tokens, positions, [KVCache(c.k.clone(), c.v.clone()) for c in batch_cache])
    assert torch.equal(batch, layered) and torch.equal(batch, torch.cat(alone))
    changed = [not torch.equal(batch[row], base[row]) for row in range(len(lengths))]
    assert changed == ([slot != 0 for slot in slots] if adapters else [False] * len(lengths))


def test_which_models_fit() -> None:
    assert not fits_fused_decode(random_model(CONFIG))  # float32
    assert not fits_fused_decode(random_model(CONFIG).to(torch.bfloat16))  # nn.Linear: use_bf16_kernel not run
    assert fits_fused_decode(quantized_model("int8")) and fits_fused_decode(quantized_model("bf16"))
    mixed = quantized_model("bf16")
    mixed.model.layers[1].self_attn.k_proj = QuantizedLinear.from_linear(mixed.model.layers[1].self_attn.k_proj, 8)
    assert fits_fused_decode(mixed)  # q, k and v of different schemes: one call each
    mixed.model.layers[1].self_attn.v_proj = torch.nn.Linear(256, 64, bias=False, dtype=torch.bfloat16)
    assert not fits_fused_decode(mixed)  # a layer the kernels do not take


def test_load_decodes_fused_with_the_same_tokens() -> None:
    llm = llamaforge.load(quantize="int4")
    assert llm.model.fused_decode is not None
    messages = [{"role": "user", "content": "What is 37 + 45?"}]
    fused = llm.chat(messages, temperature=0.0, max_new_tokens=24)
    llm.model.fused_decode = None
    layered = llm.chat(messages, temperature=0.0, max_new_tokens=24)
    assert fused.token_ids == layered.token_ids


def test_norm_and_swiglu_kernels_round_like_torch() -> None:
    """The kernels the bfloat16 CPU path uses for both: within one bfloat16 step of torch's operators (their sums
    run in another order), and almost always equal."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 1000, generator=generator) * 3).bfloat16()
    weight = torch.randn(1000, generator=generator).bfloat16()
    gate, up = (torch.randn(2, 9, 5000, generator=generator) * 4).bfloat16()
    with torch.inference_mode():
        pairs = [(kernels.bf16_rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5)),
                 (kernels.bf16_swiglu(gate, up), swiglu(gate, up))]
    for ours, torch_ in pairs:
        assert ours.dtype == torch.bfloat16 and ours.shape == torch_.shape
        torch.testing.assert_close(ours.float(), torch_.float(), rtol=2**-7, atol=1e-30)
        assert (ours != torch_).float().mean() < 0.01


def test_a_copy_decodes_fused_with_its_own_weights_and_a_moved_model_layer_by_layer() -> None:
    model = quantized_model("bf16")
    use_fused_decode(model)
    token, position = torch.tensor([5]), torch.tensor([0])
    with torch.inference_mode():
        expected = model.fused_decode(token, position, model.new_kv_cache(1, 8))
        twin = copy.deepcopy(model)
        cache = twin.new_kv_cache(1, 8)
        assert twin.fused_decode.model is twin and twin.fused_decode.takes(token, cache)
        assert torch.equal(twin.fused_decode(token, position, cache), expected)
        twin.to(torch.float32)
        assert not twin.fused_decode.takes(token, twin.new_kv_cache(1, 8))
        logits = Decoder(twin, compile=False)(token, position, twin.new_kv_cache(1, 8), 1)  # layer by layer
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_threads_decoding_with_one_model_get_their_own_numbers() -> None:
    model = quantized_model("int4")
    use_fused_decode(model)
    starts = (3, 50, 120, 200)

    def decode(first_token: int, results: list) -> None:
        cache = model.new_kv_cache(1, 64)
        with torch.inference_mode():
            results.extend(model.fused_decode(torch.tensor([(first_token + p) % CONFIG.vocab_size]),
                                              torch.tensor([p]), cache) for p in range(60))

    alone = [[] for _ in starts]
    for token, results in zip(starts, alone, strict=True):
        decode(token, results)
    together = [[] for _ in starts]
    threads = [threading.Thread(target=decode, args=(token, results)) for token, results in zip(starts, together,
                                                                                                 strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(a, b) for rows_a, rows_b in zip(alone, together, strict=True)
               for a, b in zip(rows_a, rows_b, strict=True))


def test_a_position_past_the_cache_is_refused() -> None:
    model = quantized_model("int4")
    use_fused_decode(model)
    cache = model.new_kv_cache(1, 8)
    assert model.fused_decode.takes(torch.tensor([5]), cache)
    with torch.inference_mode(), pytest.raises(IndexError, match="outside the KV cache's 8 positions"):
        model.fused_decode(torch.tensor([5]), torch.tensor([8]), cache)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_a_prompts_numbers_do_not_depend_on_how_it_is_split(mode: str) -> None:
    """A prompt prefilled whole, in uneven chunks (as the prefix cache splits it), or token by token through the
    fused decode layers: the same logits and keys and values to the bit. The int8 / int4 kernels compute each row
    alike however many rows there are, and so does the attention kernel for each query, in chunks of any length."""
    model = quantized_model(mode)
    use_fused_decode(model)
    length = 70
    prompt = torch.tensor([[(13 * i + 5) % CONFIG.vocab_size for i in range(length)]])

    def prefill(ends: list[int]) -> tuple[torch.Tensor, list[KVCache]]:
        cache, start = model.new_kv_cache(1, 80), 0
        with torch.inference_mode():
            for end in ends:
                if end - start == 1:
                    logits = model.fused_decode(prompt[:, start], torch.tensor([start]), cache)
                else:
                    logits = model(prompt[:, start:end], torch.arange(start, end)[None], cache,
                                   logits_at=torch.tensor([end - start - 1]), kv_len=end)
                start = end
        return logits, cache

    whole, whole_cache = prefill([length])
    for ends in ([23, 40, 69, 70], [1, 2, 50, 70], list(range(1, length + 1))):
        logits, cache = prefill(ends)
        assert torch.equal(logits, whole), ends
        assert all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) for a, b in zip(cache, whole_cache, strict=True))
