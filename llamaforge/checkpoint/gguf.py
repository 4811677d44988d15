"""GGUF, llama.cpp's one-file format: read a Llama GGUF into llamaforge, and write one llama.cpp runs.

References: ggml's `docs/gguf.md` (the file), gguf-py (the `gguf` package, which reads and writes it
here, quantizes and dequantizes), and llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel`: the metadata
keys, tensor names, the q/k row permutation and token types). A Llama GGUF keeps Meta's interleaved
q/k rows, so loading goes GGUF name -> Meta name -> HF name and rows (keymaps.py), and writing the
reverse. The vocabulary is SentencePiece's (`tokenizer.ggml.model = "llama"`): pieces, scores and
piece types, from which the tokenizer is rebuilt on load.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaforge.checkpoint.inventory import Inventory
from llamaforge.checkpoint.keymaps import (
    GGUF_TO_META,
    HF_TO_META,
    META_TO_GGUF,
    META_TO_HF,
    meta_to_hf,
    permute_hf_to_meta,
    rename,
)
from llamaforge.config import ModelArgs, reading
from llamaforge.errors import CheckpointError, TokenizerError
from llamaforge.quantize import QuantizedWeight, kernels
from llamaforge.quantize.formats import GGUF_SCHEMES
from llamaforge.tokenizer import Tokenizer, sentencepiece_proto

MAGIC = b"GGUF"
ARCH = "llama"
# What `llamaforge export --type` writes for the 2-D weights (norms stay float32, as llama.cpp keeps them):
# the types llama.cpp's convert_hf_to_gguf.py writes (--outtype), and Q4_0, which llama-quantize writes.
WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# ModelArgs field -> the metadata key it is read from, so errors speak the file's own words.
KEYS = {"dim": f"{ARCH}.embedding_length", "n_layers": f"{ARCH}.block_count", "n_heads": f"{ARCH}.attention.head_count",
        "n_kv_heads": f"{ARCH}.attention.head_count_kv", "hidden_dim": f"{ARCH}.feed_forward_length",
        "norm_eps": f"{ARCH}.attention.layer_norm_rms_epsilon", "max_seq_len": f"{ARCH}.context_length",
        "rope_theta": f"{ARCH}.rope.freq_base", "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF files need the gguf package: pip install 'llamaforge[gguf]'") from None
    return gguf


def is_gguf(path: Path) -> bool:
    """A file that starts with GGUF's magic."""
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == MAGIC


def open_reader(path: Path):
    """A memory-mapped `gguf.GGUFReader` (`_plain_slices`); a clear error for a damaged file."""
    gguf = _gguf()
    try:
        return _plain_slices(gguf.GGUFReader)(path)
    except Exception as exc:  # gguf raises ValueError, struct errors, numpy errors for a bad file
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


@cache
def _plain_slices(reader_class: type) -> type:
    """gguf-py's reader, its slices of the mapped file taken as plain arrays: it slices the file once or twice for
    every element of the vocabulary's three arrays (96,000 for Llama 2), and np.memmap's bookkeeping on each slice
    made that 1.0-1.3 s of every load, 0.4 s this way. The arrays still map the file; the fields and tensors are
    gguf-py's own (a test holds them equal to its plain reader's)."""

    class Reader(reader_class):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            array = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return array.view(array.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


def value(reader, key: str, default: Any = None) -> Any:
    """A metadata value (a scalar, a string, or a list); `default` when the file lacks the key."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def decimal(found: Any) -> Any:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06); a value
    that is no number as it is, for ModelArgs to refuse by its key."""
    return float(str(np.float32(found))) if isinstance(found, numbers.Real) else found


def float_value(reader, key: str, default: float) -> Any:
    """A float metadata value through `decimal`; `default` when the file lacks the key."""
    found = value(reader, key)
    return default if found is None else decimal(found)


def read_config(reader, path: Path) -> ModelArgs:
    """The model's shape from the `llama.*` metadata."""
    architecture = value(reader, "general.architecture")
    if architecture != ARCH:
        raise CheckpointError(f"{path} holds a {architecture!r} model; llamaforge runs Llama 2 ('llama') models")

    def required(key: str) -> Any:
        found = value(reader, f"{ARCH}.{key}")
        if found is None:
            raise CheckpointError(f"{path} lacks the metadata key {ARCH}.{key}; it is not a complete Llama GGUF")
        return found

    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    # The vocabulary list is read only when the embedding is missing (the load then reports that).
    vocab_size = (int(embedding.shape[1]) if embedding is not None and len(embedding.shape) == 2
                  else len(value(reader, "tokenizer.ggml.tokens") or []))
    scaling = value(reader, f"{ARCH}.rope.scaling.type")
    rope_scaling = None
    if scaling not in (None, "none"):
        rope_scaling = {"type": scaling, "factor": float_value(reader, f"{ARCH}.rope.scaling.factor", 1.0)}
    n_heads = required("attention.head_count")
    shape = {"dim": required("embedding_length"), "n_layers": required("block_count"),
             "hidden_dim": required("feed_forward_length"), "max_seq_len": required("context_length"),
             "norm_eps": decimal(required("attention.layer_norm_rms_epsilon"))}
    with reading(path, KEYS):
        config = ModelArgs(
            **shape, n_heads=n_heads, n_kv_heads=value(reader, f"{ARCH}.attention.head_count_kv", n_heads),
            vocab_size=vocab_size, rope_theta=float_value(reader, f"{ARCH}.rope.freq_base", 10000.0),
            rope_scaling=rope_scaling, tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
            bos_token_id=value(reader, "tokenizer.ggml.bos_token_id", 1),
            eos_token_id=value(reader, "tokenizer.ggml.eos_token_id", 2),
        )
    rope_dims = value(reader, f"{ARCH}.rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim:
        raise CheckpointError(f"{path} rotates {rope_dims} of each head's {config.head_dim} dimensions; Llama 2 "
                              "rotates all of them")
    return config


def read_inventory(reader, path: Path) -> Inventory:
    """Every tensor's HF name and shape (rows first, as HF's layout has them), from the GGUF header alone."""
    inventory = Inventory(path, [path], KEYS)
    for tensor in reader.tensors:
        meta_name = rename(tensor.name, GGUF_TO_META)
        name = rename(meta_name, META_TO_HF) if meta_name is not None else tensor.name
        inventory.add(name, reversed([int(n) for n in tensor.shape]), path)  # GGUF lists the innermost dim first
    return inventory


def stored_dtype(reader) -> torch.dtype:
    """The dtype a load keeps by default: the file's float type; float16 for quantized weights (as the
    Llama 2 release is), which holds a dequantized 8-bit weight exactly where bfloat16 would round it."""
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    if types <= {"F32"}:
        return torch.float32
    return torch.bfloat16 if "BF16" in types else torch.float16


# Linear weights of these types load as stored (`iter_tensors(keep_quantized=True)`): int8 / int4 / k-quant layers.
KEPT_BITS = {name: bits for name, (bits, _) in GGUF_SCHEMES.items()}
# Types stored in floats: everything else is quantized in blocks.
FLOAT_TYPES = {"F32", "F16", "BF16"}


def kept_bits(tensor) -> int | None:
    """The bits of the layer a linear weight loads as (`iter_tensors(keep_quantized=True)`): Q8_0 / Q4_0 / Q4_K /
    Q5_K / Q6_K as stored; llama.cpp's other block types (Q2_K, Q3_K, Q4_1, Q5_0, the IQ types ...) as int8 in groups
    of 32, their values quantized again, which keeps them at 8.5 bits a weight rather than 16 and adds at most half
    an int8 step to the file's own rounding. None for floats and for the embedding (a table lookup, not a product)."""
    kind = tensor.tensor_type.name
    if tensor.name == "token_embd.weight" or kind in FLOAT_TYPES or len(tensor.shape) != 2:
        return None
    return KEPT_BITS.get(kind, 8 if int(tensor.shape[0]) % 32 == 0 else None)  # shape[0]: the row width


def has_kept_types(reader) -> bool:
    """Whether any linear weight loads as an int8 / int4 layer."""
    return any(kept_bits(t) for t in reader.tensors)


def tensor_array(tensor) -> np.ndarray:
    """One GGUF tensor as a float numpy array (rows, columns): float32 and float16 as stored, anything else
    (bfloat16, quantized) dequantized to float32 (the kept types by the kernels, gguf-py's numbers, faster)."""
    gguf = _gguf()
    shape = tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists the innermost dimension first
    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.array(tensor.data).reshape(shape)
    if kind.name in GGUF_SCHEMES and len(shape) == 2:
        return kernels.dequantize(kernels.repack_gguf(tensor.data, kind.name, shape), torch.float32).numpy()
    return gguf.quants.dequantize(tensor.data, kind).reshape(shape)


def iter_tensors(reader, config: ModelArgs, keep_quantized: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """HF-named tensors in HF's row layout, one at a time.

    With `keep_quantized`, Q8_0, Q4_0, Q4_K, Q5_K and Q6_K linear weights come as QuantizedWeight (int8 / int4 in
    groups of 32, or the k-quants' codes, scales and mins: the same numbers repacked, nothing rounded again) instead
    of dequantized floats, and other quantized linear weights as int8 in groups of 32 (see `kept_bits`); the
    embedding, a table lookup rather than a product, is dequantized as before.
    """
    for tensor in reader.tensors:
        meta_name = rename(tensor.name, GGUF_TO_META)
        if meta_name is None:  # read_inventory has named it, and the load refused it
            continue
        bits = kept_bits(tensor) if keep_quantized else None
        if bits is not None:
            shape = tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists the innermost dimension first
            # The q / k row order (Meta's interleaved -> HF's rotate-half) moves whole rows: find it by
            # permuting row numbers, then move the rows' codes and scales alike.
            name, rows = meta_to_hf(meta_name, torch.arange(shape[0], dtype=torch.float64)[:, None],
                                    config.n_heads, config.n_kv_heads)
            order = rows[:, 0].long()
            if tensor.tensor_type.name in KEPT_BITS:
                moved = None if torch.equal(order, torch.arange(shape[0])) else order
                yield name, kernels.repack_gguf(tensor.data, tensor.tensor_type.name, shape, moved)
            else:
                yield name, kernels.quantize(torch.from_numpy(tensor_array(tensor))[order], bits, 32)
            continue
        yield meta_to_hf(meta_name, torch.from_numpy(tensor_array(tensor)), config.n_heads, config.n_kv_heads)


def read_tokenizer(reader, path: Path) -> Tokenizer | None:
    """The SentencePiece tokenizer rebuilt from the file's vocabulary; None when the file has none."""
    model = value(reader, "tokenizer.ggml.model")
    if model is None:
        return None
    if model != "llama":
        raise TokenizerError(f"{path} has a {model!r} tokenizer; Llama 2 uses SentencePiece ('llama')")
    tokens = value(reader, "tokenizer.ggml.tokens")
    scores = value(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))
    types = value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    proto = sentencepiece_proto(
        list(zip(tokens, scores, types, strict=True)),
        unk_id=value(reader, "tokenizer.ggml.unknown_token_id", 0),
        bos_id=value(reader, "tokenizer.ggml.bos_token_id", 1), eos_id=value(reader, "tokenizer.ggml.eos_token_id", 2),
        add_dummy_prefix=value(reader, "tokenizer.ggml.add_space_prefix", True),
        remove_extra_whitespaces=value(reader, "tokenizer.ggml.remove_extra_whitespaces", False),
    )
    return Tokenizer(path, model_proto=proto)


def write_gguf(state: Mapping[str, torch.Tensor], config: ModelArgs, tokenizer: Tokenizer, path: str | Path,
               weight_type: str = "f16", name: str = "llama", chat_template: str | None = None) -> Path:
    """Write a Llama GGUF that llama.cpp loads: metadata, the SentencePiece vocabulary (and `chat_template`,
    Jinja, for llama.cpp's chat endpoint), and the weights.

    2-D weights are stored as `weight_type`; a weight whose rows do not split into 32-value blocks stays
    float16, and norms stay float32 (both as llama.cpp's converter does). With q4_0 the output projection is
    stored as Q8_0: it decides every token (llama-quantize keeps it at Q6_K for the same reason). The file is
    written to a temporary name and renamed into place, so a crash never leaves a half-written GGUF.
    """
    gguf = _gguf()
    if weight_type not in WEIGHT_TYPES:
        raise CheckpointError(f"unknown GGUF weight type {weight_type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    path = Path(path)
    if path.suffix != ".gguf":
        raise CheckpointError(f"{path}: a GGUF file's name ends in .gguf")
    if path.exists():
        raise CheckpointError(f"{path} already exists; choose a new --out file")
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    vocabulary = model_pb2.ModelProto.FromString(tokenizer.sentencepiece_model())
    if len(vocabulary.pieces) != config.vocab_size:
        raise TokenizerError(f"the tokenizer has {len(vocabulary.pieces)} pieces but the model {config.vocab_size} "
                             "embedding rows; export needs the tokenizer trained with these weights")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, ARCH)
    _write_metadata(writer, gguf, config, vocabulary, weight_type, name)
    if chat_template:
        writer.add_chat_template(chat_template)
    plan = _tensor_plan(gguf, state, config, weight_type)
    # Two passes, so that one tensor at a time is ever encoded: the header lists every tensor's type and size,
    # then each is read (a quantized model's dequantized again: see DenseState), encoded and written (a 7B model's
    # whole F16 file held in memory would double its footprint).
    for gguf_name, _, shape, kind in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, hf_name, _, kind in plan:
            writer.write_tensor_data(_encode(gguf, _meta_layout(gguf_name, state[hf_name], config), kind))
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _write_metadata(writer, gguf, config: ModelArgs, vocabulary, weight_type: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.rope_scaling is not None:
        if config.rope_scaling["type"] != "linear":
            raise CheckpointError(f"llama.cpp has no {config.rope_scaling['type']!r} RoPE scaling for Llama; "
                                  "export a model with linear scaling or none")
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                  "q4_0": "MOSTLY_Q4_0"}
    writer.add_file_type(gguf.LlamaFileType[file_types[weight_type]])
    if weight_type in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    trainer, normalizer = vocabulary.trainer_spec, vocabulary.normalizer_spec
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([piece.piece.encode("utf-8") for piece in vocabulary.pieces])
    writer.add_token_scores([piece.score for piece in vocabulary.pieces])
    writer.add_token_types([piece.type for piece in vocabulary.pieces])  # SentencePiece's numbering is GGUF's
    writer.add_unk_token_id(trainer.unk_id)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(normalizer.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(normalizer.remove_extra_whitespaces)


def _tensor_plan(gguf, state: Mapping[str, torch.Tensor], config: ModelArgs,
                 weight_type: str) -> list[tuple[str, str, tuple[int, ...], Any]]:
    """(GGUF name, state key, shape, GGML type) of each tensor a file of `weight_type` stores, in the file's order."""
    plan = []
    for hf_name in state:
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when the file has no output.weight
        meta_name = rename(hf_name, HF_TO_META)
        if meta_name is None:
            raise CheckpointError(f"the model has a tensor GGUF's Llama layout does not: {hf_name}")
        gguf_name = rename(meta_name, META_TO_GGUF)
        shape = tuple(state[hf_name].shape)
        plan.append((gguf_name, hf_name, shape, _stored_type(gguf, gguf_name, shape, weight_type)))
    return plan


def _meta_layout(gguf_name: str, weight: torch.Tensor, config: ModelArgs) -> np.ndarray:
    """A weight as float32 in Meta's layout, which GGUF keeps (q and k rows in Meta's rotary order)."""
    weight = weight.detach().to("cpu", torch.float32)
    if gguf_name.endswith("attn_q.weight"):
        weight = permute_hf_to_meta(weight, config.n_heads)
    elif gguf_name.endswith("attn_k.weight"):
        weight = permute_hf_to_meta(weight, config.n_kv_heads)
    return weight.numpy()


def _stored_type(gguf, gguf_name: str, shape: tuple[int, ...], weight_type: str) -> Any:
    """The GGML type tensor `gguf_name` of `shape` is stored as: norms (1-D) in float32, weights as asked (float16
    where a quantized type's blocks do not divide the rows; the output projection of a q4_0 file in Q8_0)."""
    kinds = gguf.GGMLQuantizationType
    if len(shape) == 1 or weight_type == "f32":
        return kinds.F32
    if weight_type == "q4_0" and gguf_name == "output.weight":
        weight_type = "q8_0"
    quantized = {"q8_0": kinds.Q8_0, "q4_0": kinds.Q4_0}.get(weight_type)
    if quantized is not None and shape[-1] % gguf.GGML_QUANT_SIZES[quantized][0] == 0:
        return quantized
    return kinds.BF16 if weight_type == "bf16" else kinds.F16


def _encode(gguf, array: np.ndarray, kind: Any) -> np.ndarray:
    """The tensor's bytes as GGML type `kind`."""
    kinds = gguf.GGMLQuantizationType
    if kind == kinds.F32:
        return array.astype(np.float32)
    if kind == kinds.F16:
        return array.astype(np.float16)
    if kind in (kinds.Q8_0, kinds.Q4_0):  # gguf-py's bytes, from the kernels' quantizer where it runs (~10x faster)
        blocks = kernels.quantize_gguf(array, 8 if kind == kinds.Q8_0 else 4)
        if blocks is not None:
            return blocks
    return gguf.quants.quantize(array, kind)
