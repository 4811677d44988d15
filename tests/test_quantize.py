"""NF4 quantization: the codebook, exact round trips, the 4-bit linear's forward/backward, and a whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.config import ModelArgs
from llamaforge.model import Llama, init_weights
from llamaforge.quantize import (
    NF4_CODE,
    NF4Linear,
    dequantize_nf4,
    dequantize_nf4_blockwise,
    pack_4bit,
    quantize_linears_nf4,
    quantize_nf4,
    quantize_nf4_blockwise,
    unpack_4bit,
)

# bitsandbytes' NF4 table (bitsandbytes/backends/utils.py, `_NF4_QUANT_TABLE`), copied by hand.
BITSANDBYTES_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def nearest_codes(weight: torch.Tensor, absmax: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Brute-force reference: index of the closest codebook value to each weight / its block's absmax."""
    scaled = weight.float().reshape(-1, block_size) / absmax[:, None]  # (n_blocks, block_size)
    return (scaled[..., None] - NF4_CODE).abs().argmin(dim=-1).reshape(-1)


def test_codebook_is_bitsandbytes_table() -> None:
    assert NF4_CODE.dtype == torch.float32
    assert torch.equal(NF4_CODE, torch.tensor(BITSANDBYTES_NF4))


def test_codebook_is_normal_quantiles() -> None:
    # QLoRA's construction (bitsandbytes' create_normal_map): 8 positive and 7 negative N(0, 1) quantiles
    # at evenly spaced probabilities, plus an exact 0, scaled to [-1, 1].
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    torch.testing.assert_close(NF4_CODE, (values / values.abs().max()).float(), atol=1e-6, rtol=0)


def test_pack_round_trips_all_codes_high_nibble_first() -> None:
    codes = torch.cat([torch.arange(16), torch.randperm(16), torch.arange(15, -1, -1)]).to(torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() // 2
    assert torch.equal(unpack_4bit(packed), codes)
    assert pack_4bit(torch.tensor([0xA, 0x5], dtype=torch.uint8)).item() == 0xA5  # bitsandbytes' order


def test_blockwise_round_trip_is_nearest_code_times_absmax() -> None:
    weight = torch.randn(256, 512)
    packed, absmax = quantize_nf4_blockwise(weight)
    assert packed.shape == (256 * 512 // 2,) and packed.dtype == torch.uint8
    assert torch.equal(absmax, weight.reshape(-1, 64).abs().amax(dim=1))
    codes = unpack_4bit(packed).long()
    assert torch.equal(codes, nearest_codes(weight, absmax))
    expected = (NF4_CODE[codes].reshape(-1, 64) * absmax[:, None]).reshape(weight.shape)
    assert torch.equal(dequantize_nf4_blockwise(packed, absmax, weight.shape), expected)


def test_double_quantized_round_trip_error() -> None:
    weight = torch.randn(256, 512)
    q = quantize_nf4(weight)
    packed, absmax = quantize_nf4_blockwise(weight)
    assert torch.equal(q.packed, packed)  # double quantization touches only the scales
    assert q.absmax_codes.dtype == torch.int8 and q.absmax_codes.shape == (2048,)
    assert q.absmax_scales.dtype == torch.float32 and q.absmax_scales.shape == (8,)
    # Each block scale is off by at most half an int8 step of its group.
    steps = q.absmax_scales.repeat_interleave(256)
    scales = q.absmax_codes.float() * steps + q.absmax_mean
    assert ((scales - absmax).abs() <= steps / 2 + 1e-6).all()
    restored = dequantize_nf4(q)
    assert restored.shape == weight.shape and restored.dtype == weight.dtype
    error = (restored - weight).abs().mean() / weight.std()
    # NF4 with blocks of 64 loses ~7% of a normal weight's std (measured 0.073); double quant adds ~0.1%.
    assert 0.06 < error < 0.085
    exact = dequantize_nf4_blockwise(packed, absmax, weight.shape)
    assert (restored - exact).abs().max() < 0.01 * weight.abs().max()


def test_scale_count_not_a_multiple_of_the_scale_block_is_padded() -> None:
    weight = torch.randn(64, 5 * 64) * 0.02  # 320 blocks: one full group of 256 scales and one of 64
    q = quantize_nf4(weight)
    assert q.absmax_codes.shape == (320,) and q.absmax_scales.shape == (2,)
    assert (dequantize_nf4(q) - weight).abs().mean() / weight.std() < 0.085


def test_bf16_weight_keeps_its_dtype() -> None:
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    q = quantize_nf4(weight)
    assert q.dtype == torch.bfloat16 and q.shape == weight.shape
    assert dequantize_nf4(q).dtype == torch.bfloat16
    assert dequantize_nf4(q, torch.float32).dtype == torch.float32


def test_numel_not_a_multiple_of_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(3, 10\).*block size 64"):
        quantize_nf4(torch.randn(3, 10))


def test_zero_blocks_give_zeros_not_nan() -> None:
    weight = torch.randn(4, 256)
    weight[1, 64:128] = 0
    q = quantize_nf4(weight)
    zero_code = NF4_CODE.tolist().index(0.0)
    assert (unpack_4bit(q.packed).reshape(4, 256)[1, 64:128] == zero_code).all()
    restored = dequantize_nf4(q)
    assert not restored.isnan().any()
    assert torch.equal(restored[1, 64:128], torch.zeros(64))
    zeros = quantize_nf4(torch.zeros(8, 64))
    assert (unpack_4bit(zeros.packed) == zero_code).all() and (zeros.absmax_codes == 0).all()
    assert torch.equal(dequantize_nf4(zeros), torch.zeros(8, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_forward_equals_dense_dequantized(dtype: torch.dtype) -> None:
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=False))
    assert (layer.in_features, layer.out_features) == (128, 64)
    assert list(layer.parameters()) == []
    x = torch.randn(3, 5, 128, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 64)
    assert torch.equal(y, F.linear(x, dequantize_nf4(layer.nf4_weight, dtype)))
    assert torch.equal(layer.dequantize(), dequantize_nf4(layer.nf4_weight))
    assert "in_features=128, out_features=64" in repr(layer)


def test_nf4_linear_compute_dtype() -> None:
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=False), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.linear(x.bfloat16(), layer.dequantize().bfloat16()).float())


def test_nf4_linear_refuses_bias() -> None:
    with pytest.raises(ValueError, match="bias"):
        NF4Linear.from_linear(nn.Linear(64, 64))


def test_nf4_linear_backward_matches_dense_and_saves_no_dense_weight() -> None:
    layer = NF4Linear.from_linear(nn.Linear(512, 256, bias=False))
    x = torch.randn(2, 7, 512, requires_grad=True)
    grad_output = torch.randn(2, 7, 256)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).backward(grad_output)
    dense_weight = layer.dequantize()
    dense_x = x.detach().clone().requires_grad_()
    F.linear(dense_x, dense_weight).backward(grad_output)
    torch.testing.assert_close(x.grad, dense_x.grad)

    dense_bytes = dense_weight.numel() * dense_weight.element_size()
    assert not any(t.is_floating_point() and t.numel() >= dense_weight.numel() for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) < 0.15 * dense_bytes
    # The hook does see a dense weight when one is saved: a trainable nn.Linear saves it (and x).
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.linear(dense_x, dense_weight.requires_grad_())
    assert sum(t.numel() * t.element_size() for t in saved) >= dense_bytes


@pytest.fixture
def tiny_pair(tiny_config: ModelArgs) -> tuple[Llama, Llama]:
    """(dense, quantized) copies of one tiny random model."""
    dense = init_weights(Llama(tiny_config))
    quantized = init_weights(Llama(tiny_config))
    return dense, quantize_linears_nf4(quantized)


def test_quantize_linears_replaces_all_but_lm_head(tiny_pair: tuple[Llama, Llama], tiny_config: ModelArgs) -> None:
    dense, quantized = tiny_pair
    assert [name for name, m in quantized.named_modules() if isinstance(m, nn.Linear)] == ["lm_head"]
    assert sum(isinstance(m, NF4Linear) for m in quantized.modules()) == 7 * tiny_config.n_layers
    input_ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        expected, logits = dense(input_ids), quantized(input_ids)
    error = (logits - expected).norm() / expected.norm()
    assert 0 < error < 0.1  # measured 0.06: the decoder layers' share of the logits moves by ~14%


def test_quantized_state_dict_is_small_and_loads(tiny_pair: tuple[Llama, Llama], tiny_config: ModelArgs) -> None:
    dense, quantized = tiny_pair
    quantized_names = {name for name, m in quantized.named_modules() if isinstance(m, NF4Linear)}

    def linear_bytes(model: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for key, t in model.state_dict().items()
                   if key.rpartition(".")[0] in quantized_names)

    assert linear_bytes(quantized) < 0.3 * linear_bytes(dense)
    other = quantize_linears_nf4(init_weights(Llama(tiny_config), seed=1))
    other.load_state_dict(quantized.state_dict())
    input_ids = torch.randint(0, tiny_config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(other(input_ids), quantized(input_ids))


def test_model_to_bf16_keeps_quantized_buffers(tiny_pair: tuple[Llama, Llama], tiny_config: ModelArgs) -> None:
    _, quantized = tiny_pair
    layer = quantized.model.layers[0].mlp.down_proj
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    weight = layer.dequantize()
    quantized.to(torch.bfloat16)
    for name, buffer in layer.named_buffers():
        assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name]), name
    assert layer.weight_dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), weight.bfloat16())
    with torch.no_grad():
        logits = quantized(torch.randint(0, tiny_config.vocab_size, (1, 8)))
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip_matches_cpu() -> None:
    weight = torch.randn(256, 512)
    cpu = quantize_nf4(weight)
    cuda = quantize_nf4(weight.cuda())
    assert cuda.packed.is_cuda
    assert (cuda.packed.cpu() != cpu.packed).float().mean() < 1e-4  # rounding on a midpoint may differ
    # Both are within half an int8 step of the exact block scale, times |code| <= 1.
    step = cpu.absmax_scales.max().item()
    torch.testing.assert_close(dequantize_nf4(cuda).cpu(), dequantize_nf4(cpu), atol=step, rtol=0)
    layer = NF4Linear.from_linear(nn.Linear(512, 256, bias=False)).cuda()
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.is_cuda and x.grad.isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_bitsandbytes() -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(256, 512, device="cuda")
    their_packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed, absmax = quantize_nf4_blockwise(weight)
    torch.testing.assert_close(absmax, state.absmax)
    assert (their_packed.reshape(-1) != packed).float().mean() < 1e-4
    theirs = functional.dequantize_4bit(their_packed, state)
    torch.testing.assert_close(dequantize_nf4_blockwise(their_packed.reshape(-1), state.absmax, weight.shape), theirs)
    q = quantize_nf4(weight)
    # Double quantization moves each block scale by at most half an int8 step, and |code| <= 1.
    torch.testing.assert_close(dequantize_nf4(q), theirs, atol=q.absmax_scales.max().item() / 2 + 1e-6, rtol=0)
