"""The model against HF transformers' LlamaForCausalLM, and cached decoding against full forwards."""

from __future__ import annotations

import pytest
import torch
from factories import random_model

from llamaforge.checkpoint import build_model
from llamaforge.config import PRESETS, ModelArgs
from llamaforge.model import BlockTable, KVCache, Llama, init_weights, random_weights

transformers = pytest.importorskip("transformers")

CASES = {
    "multi-head": {},
    "gqa": {"n_kv_heads": 2},
    "linear-rope": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "dynamic-rope": {"n_kv_heads": 2, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    "rope-theta": {"rope_theta": 500000.0},
}


def small_config(**changes) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=8, vocab_size=300, hidden_dim=96, max_seq_len=32, **changes)


def hf_twin(model: Llama) -> torch.nn.Module:
    """The same weights in transformers' implementation."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_config()))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    return hf.eval()


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(case: str) -> None:
    model = random_model(small_config(**CASES[case]))
    hf = hf_twin(model)
    # 80 positions: past the trained context of 32, where linear and dynamic scaling take effect.
    input_ids = torch.randint(0, 300, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(input_ids), hf(input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_rope_scaling_changes_logits_beyond_context() -> None:
    """Guard for the test above: the scaled cases would fail if scaling were ignored."""
    scaled = random_model(small_config(rope_scaling={"type": "dynamic", "factor": 2.0}))
    plain = Llama(small_config()).eval()
    plain.load_state_dict(scaled.state_dict())
    input_ids = torch.randint(0, 300, (1, 80))
    with torch.no_grad():
        assert (scaled(input_ids) - plain(input_ids)).abs().max() > 1e-2
        # Inside the trained context dynamic NTK is the identity.
        torch.testing.assert_close(scaled(input_ids[:, :32]), plain(input_ids[:, :32]))


def test_parameter_names_are_transformers_names() -> None:
    model = Llama(small_config(n_kv_heads=2))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_config()))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    assert ours == theirs


@pytest.mark.parametrize("case", ["gqa", "linear-rope", "multi-head"])
def test_cached_decoding_equals_full_forward(case: str) -> None:
    model = random_model(small_config(**CASES[case]))
    input_ids = torch.randint(0, 300, (2, 60))
    positions = torch.arange(60).expand(2, 60)
    cache = model.new_kv_cache(batch_size=2, max_len=60)
    with torch.no_grad():
        full = model(input_ids)
        steps = [model(input_ids[:, :20], positions[:, :20], cache)]
        steps += [model(input_ids[:, t:t + 1], positions[:, t:t + 1], cache) for t in range(20, 60)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=5e-5, rtol=1e-5)


def test_rows_with_different_positions_share_a_batch() -> None:
    """A short row right-padded into a batch decodes as if alone: its padding stays invisible."""
    model = random_model(small_config(n_kv_heads=2))
    long, short = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        alone = model(short)[0, -1]
        cache = model.new_kv_cache(batch_size=2, max_len=13)
        padded = torch.cat([long, torch.cat([short[:, :7], torch.zeros(1, 5, dtype=torch.long)], 1)])
        model(padded, torch.arange(12).expand(2, 12), cache)
        # Row 1's 8th token overwrites padding at position 7; positions 8..11 still hold padding.
        step = model(torch.tensor([[long[0, -1]], [short[0, -1]]]), torch.tensor([[12], [7]]), cache)
    torch.testing.assert_close(step[1, -1], alone, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(dtype: torch.dtype) -> None:
    model = random_model(small_config(n_kv_heads=2), std=0.05)
    input_ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        reference = model(input_ids)
        low = model.to(dtype)(input_ids)
    assert low.dtype == dtype
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_presets_have_llama2_sizes() -> None:
    billions = {name: PRESETS[name].num_parameters() / 1e9 for name in ("7B", "13B", "70B")}
    assert billions["7B"] == pytest.approx(6.74, abs=0.01)
    assert billions["13B"] == pytest.approx(13.02, abs=0.01)
    assert billions["70B"] == pytest.approx(68.98, abs=0.01)
    assert PRESETS["70B"].n_kv_heads == 8 and PRESETS["70B"].context_length == 4096


def test_num_parameters_matches_module() -> None:
    config = small_config(n_kv_heads=2)
    assert config.num_parameters() == sum(p.numel() for p in Llama(config).parameters())


def test_cache_row_views_address_slots_of_a_shared_cache() -> None:
    """Sequences in slots 3 and 1 of a 4-slot cache, prefilled in chunks through one-row views, then
    decoded together over the run of slots 1..3 (slot 2 free, riding along) as if each were alone."""
    model = random_model(small_config(n_kv_heads=2))
    a, b = torch.randint(0, 300, (1, 20)), torch.randint(0, 300, (1, 13))
    cache = model.new_kv_cache(batch_size=4, max_len=32)
    with torch.no_grad():
        expected_a, expected_b = model(a)[0, -1], model(b)[0, -1]
        for seq, slot in ((a, 3), (b, 1)):
            for start in range(0, seq.shape[1] - 1, 8):  # chunks of 8, leaving the last token to decode
                chunk = seq[:, start:min(start + 8, seq.shape[1] - 1)]
                model(chunk, torch.arange(start, start + chunk.shape[1])[None], [c.rows(slot, slot + 1) for c in cache])
        step = model(torch.tensor([[b[0, -1]], [0], [a[0, -1]]]), torch.tensor([[12], [0], [19]]),
                     [c.rows(1, 4) for c in cache])
    torch.testing.assert_close(step[2, -1], expected_a, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, -1], expected_b, atol=5e-5, rtol=1e-5)


def paged_views(model: Llama, rows: list[list[int]], block_len: int) -> list[KVCache]:
    """A step's views of a fresh paged pool in which row r holds the blocks rows[r] (in that order)."""
    pool = model.new_kv_pool(1 + max(max(blocks) for blocks in rows), block_len)
    table = BlockTable(torch.tensor(rows), block_len)
    return [layer.paged(table) for layer in pool]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_paged_cache_gives_a_contiguous_caches_logits(dtype: torch.dtype) -> None:
    """Two sequences prefilled together (one padded) and decoded, their positions in scattered blocks of 4 of a pool:
    the same logits as with contiguous rows (bfloat16: through the C attention kernel where the CPU has it, which
    reads each position where its block is)."""
    from llamaforge.quantize import use_bf16_kernel

    model = random_model(small_config(n_kv_heads=2)).to(dtype)
    use_bf16_kernel(model)
    tokens = torch.randint(0, 300, (2, 23))
    lengths = [23, 9]
    paged = paged_views(model, [[7, 2, 11, 4, 9, 1, 13, 3], [5, 12, 8, 6, 10, 0, 0, 0]], block_len=4)
    contiguous = model.new_kv_cache(2, 32)
    outputs = {}
    with torch.inference_mode():
        for name, cache in (("paged", paged), ("contiguous", contiguous)):
            prefill = model(tokens[:, :lengths[1]], torch.arange(lengths[1]).expand(2, -1), cache, kv_len=lengths[1])
            rest = model(tokens[:1, lengths[1]:], torch.arange(lengths[1], 23)[None],
                         [c.rows(0, 1) if c.table is None else c.paged(BlockTable(c.table.blocks[:1], 4))
                          for c in cache], kv_len=23)
            steps = [model(torch.tensor([[5], [6 + i]]), torch.tensor([[23 + i], [lengths[1] + i]]), cache,
                           kv_len=24 + i) for i in range(5)]
            outputs[name] = [prefill, rest, *steps]
    for got, expected in zip(outputs["paged"], outputs["contiguous"], strict=True):
        assert torch.equal(got, expected)


def test_packed_examples_do_not_attend_to_each_other() -> None:
    """Three examples in one row, positions restarting at 0: each one's logits equal its logits alone."""
    model = random_model(small_config(n_kv_heads=2))
    generator = torch.Generator().manual_seed(4)
    examples = [torch.randint(0, 300, (n,), generator=generator) for n in (7, 12, 5)]
    packed = torch.cat(examples)[None]
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    with torch.no_grad():
        together = model(packed, positions)[0]
        apart = torch.cat([model(e[None])[0] for e in examples])
        leaky = model(packed)[0]  # the plain causal mask: later examples see earlier ones
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=0)
    assert (leaky[7:] - apart[7:]).abs().max() > 1e-2


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = random_model(small_config(n_kv_heads=2), std=0.05).train()
    input_ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(input_ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)


def test_chunked_loss_equals_cross_entropy_of_full_logits() -> None:
    model = random_model(small_config(n_kv_heads=2), std=0.05).train()
    input_ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(8))
    mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(9)) > 0.3
    targets = torch.randint(0, 300, (int(mask.sum()),))
    results = []
    for chunked in (False, True):
        model.zero_grad()
        if chunked:  # chunks of 5 rows: several chunks and a ragged last one
            model.loss_chunk = 5
            loss = model(input_ids, logits_at=mask, targets=targets)
        else:
            loss = torch.nn.functional.cross_entropy(model(input_ids, logits_at=mask), targets, reduction="sum")
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for full, chunked in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(chunked, full)


@pytest.mark.parametrize("tied", [False, True])
def test_random_weights_stream_the_values_init_weights_gives(tied: bool) -> None:
    """A model built from random_weights (a 7B model in bfloat16 without a float32 copy) is init_weights' model."""
    config = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96,
                       tie_word_embeddings=tied)
    expected = init_weights(Llama(config), seed=3).state_dict()
    built = build_model(config, random_weights(config, seed=3), torch.bfloat16, torch.device("cpu")).state_dict()
    assert built.keys() == expected.keys()
    for name, value in expected.items():
        assert built[name].dtype == torch.bfloat16 and torch.equal(built[name], value.to(torch.bfloat16)), name
