"""Quantized weights: int8 / int4 for fast inference (llama.cpp's Q8_0 / Q4_0 rules), NF4 for QLoRA."""

from llamaforge.quantize.formats import QuantizedWeight, dequantize_weight, from_gguf_blocks, quantize_weight
from llamaforge.quantize.fused import FusedDecode, use_fused_decode
from llamaforge.quantize.linear import (
    MODES,
    Bf16Linear,
    QuantizedLinear,
    check_batch_invariant,
    dense_state_dict,
    linear_bytes,
    parse_mode,
    quantize_model,
    use_bf16_kernel,
    weight_quantizer,
)
from llamaforge.quantize.nf4 import (
    NF4_CODE,
    NF4Linear,
    NF4Weight,
    dequantize_nf4,
    dequantize_nf4_blockwise,
    pack_4bit,
    quantize_linears_nf4,
    quantize_nf4,
    quantize_nf4_blockwise,
    unpack_4bit,
)

__all__ = [
    "Bf16Linear", "FusedDecode", "MODES", "NF4Linear", "NF4Weight", "NF4_CODE", "QuantizedLinear", "QuantizedWeight",
    "check_batch_invariant", "dense_state_dict", "dequantize_nf4", "dequantize_nf4_blockwise", "dequantize_weight",
    "from_gguf_blocks", "linear_bytes", "pack_4bit", "parse_mode", "quantize_linears_nf4", "quantize_model",
    "quantize_nf4", "quantize_nf4_blockwise", "quantize_weight", "unpack_4bit", "use_bf16_kernel", "use_fused_decode",
    "weight_quantizer",
]
