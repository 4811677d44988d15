"""GGUF: what `llamaforge export` writes loads in transformers and llama.cpp as the same model, and loads back.

llama.cpp itself runs when a python with llama-cpp-python is named by LLAMAFORGE_LLAMA_CPP_PYTHON (it
is a benchmark baseline built in its own venv by ../shared/tools/llamacpp-venv.sh, not a dependency).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import q4_k_bytes, q6_k_bytes, random_model, write_hf_dir
from test_checkpoint import STORIES_GREEDY_200

import llamaforge
from llamaforge.chat import JINJA_TEMPLATE
from llamaforge.checkpoint import gguf as gguf_checkpoint
from llamaforge.checkpoint.gguf import write_gguf
from llamaforge.cli import main
from llamaforge.config import ModelArgs
from llamaforge.errors import CheckpointError, TokenizerError
from llamaforge.quantize import QuantizedLinear, kernels

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'llamaforge[gguf]')")
LLAMA_CPP_PYTHON = os.environ.get("LLAMAFORGE_LLAMA_CPP_PYTHON")
TEXTS = ["Hello world", "  two leading spaces", "tabs\tand\nnewlines\n\n", "Café naïve jalapeño 🦙", "1234567",
         "[INST] What is 2 + 2? [/INST]", "a  b   c", ""]


def export(llm: llamaforge.LLM, path: Path, weight_type: str = "f32") -> Path:
    return write_gguf(llm.model.state_dict(), llm.config, llm.tokenizer, path, weight_type,
                      chat_template=JINJA_TEMPLATE)


def logits(llm: llamaforge.LLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model(torch.tensor([ids])).float()[0]


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_path: Path) -> Path:
    """A random model with grouped-query attention, so q and k are permuted with different head counts."""
    config = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=80, max_seq_len=128)
    return write_hf_dir(tmp_path_factory.mktemp("gqa") / "model", random_model(config, std=0.1), tiny_tokenizer_path)


def test_export_then_load_is_the_same_model(gqa_model_dir: Path, tmp_path: Path) -> None:
    base = llamaforge.load(gqa_model_dir, dtype=torch.float32)
    path = export(base, tmp_path / "model.gguf")
    loaded = llamaforge.load(path)
    assert loaded.format == "gguf" and loaded.dtype == torch.float32
    assert gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents() == JINJA_TEMPLATE
    assert loaded.config.replace(extra={}) == base.config.replace(extra={})
    for text in TEXTS:
        assert loaded.tokenizer.encode(text, bos=True) == base.tokenizer.encode(text, bos=True), text
    ids = base.tokenizer.encode("The llama hums a quiet song", bos=True)
    torch.testing.assert_close(logits(loaded, ids), logits(base, ids), rtol=0, atol=1e-5)
    generated = loaded.generate("The llama", max_new_tokens=12, temperature=0.0)
    assert generated.token_ids == base.generate("The llama", max_new_tokens=12, temperature=0.0).token_ids


def test_transformers_reads_our_gguf_as_the_same_model(gqa_model_dir: Path, tmp_path: Path) -> None:
    """transformers' own GGUF loader (its q/k un-permutation and metadata mapping) as an independent reader."""
    transformers = pytest.importorskip("transformers")
    base = llamaforge.load(gqa_model_dir, dtype=torch.float32)
    export(base, tmp_path / "model.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                           torch_dtype=torch.float32).eval()
    ids = base.tokenizer.encode("The llama hums a quiet song", bos=True)
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, logits(base, ids), rtol=0, atol=1e-5)


def test_the_reader_reads_what_gguf_pys_reader_reads(gqa_model_dir: Path, tmp_path: Path) -> None:
    """open_reader's faster slicing of the mapped file (`_plain_slices`) gives gguf-py's own fields and tensors:
    every metadata value and type, the vocabulary, every tensor's name, type, shape, offset and bytes."""
    path = export(llamaforge.load(gqa_model_dir, dtype=torch.float32), tmp_path / "model.gguf", "q4_0")
    ours, theirs = gguf_checkpoint.open_reader(path), gguf.GGUFReader(path)
    assert type(ours) is not gguf.GGUFReader and len(theirs.fields["tokenizer.ggml.tokens"].contents()) > 100
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert (ours.fields[key].types, ours.fields[key].contents()) == (field.types, field.contents()), key
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.data.dtype, t.data.shape)
            for t in ours.tensors] == [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.data.dtype,
                                        t.data.shape) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data, equal_nan=a.data.dtype.kind == "f")
               for a, b in zip(ours.tensors, theirs.tensors, strict=True))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "gguf-py"])
def test_export_writes_llama_cpps_quantizer_bytes(kind: str, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Q8_0 / Q4_0 export encodes a weight into exactly gguf-py's (llama.cpp's reference quantizer's) bytes, through
    the kernels' quantizer where it runs (kernels.quantize_gguf) or gguf-py's own: rows of every magnitude, an all-zero
    block (one starting with -0.0), a magnitude tied between signs."""
    if compiled and kernels.native() is None:
        pytest.skip("the compiled quantizer needs the int8/int4 kernel library (AVX-512 VNNI or AVX2, a C compiler)")
    if not compiled:
        monkeypatch.setattr(kernels, "native", lambda: None)
    weight = (torch.randn(40, 256) * torch.rand(40, 1) * 0.1).numpy()
    weight[1, :32] = 0.0
    weight[2, :32] = 0.0
    weight[2, 0] = -0.0
    weight[4, 3], weight[4, 7] = 0.05, -0.05
    gguf_type = getattr(gguf.GGMLQuantizationType, kind)
    encoded = gguf_checkpoint._encode(gguf, weight, gguf_type)
    assert encoded.dtype == np.uint8 and np.array_equal(encoded, gguf.quants.quantize(weight, gguf_type))


def test_q8_0_holds_llama_cpps_8_bit_weights(gqa_model_dir: Path, tmp_path: Path) -> None:
    base = llamaforge.load(gqa_model_dir, dtype=torch.float32)
    path = export(base, tmp_path / "model.gguf", "q8_0")
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # its rows of 80 do not split into Q8_0's blocks of 32
    loaded = llamaforge.load(path, dtype=torch.float32, quantize=None)  # None: dequantized to dense weights
    # What llama.cpp computes with: each weight quantized and dequantized by gguf-py's reference code.
    weight = base.model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)
    torch.testing.assert_close(loaded.model.model.layers[1].mlp.up_proj.weight, torch.from_numpy(expected))
    ids = base.tokenizer.encode("The llama hums", bos=True)
    assert (logits(loaded, ids) - logits(base, ids)).abs().max() < 0.1


@pytest.mark.parametrize(("weight_type", "bits"), [("q8_0", 8), ("q4_0", 4)])
def test_q8_0_and_q4_0_load_as_int8_and_int4_layers_without_rounding_again(gqa_model_dir: Path, tmp_path: Path,
                                                                          weight_type: str, bits: int) -> None:
    """By default a GGUF's Q8_0 / Q4_0 linears become int8 / int4 layers holding the file's own codes and scales."""
    base = llamaforge.load(gqa_model_dir, dtype=torch.float32)
    path = export(base, tmp_path / "model.gguf", weight_type)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.attn_q.weight"] == weight_type.upper() and kinds["output.weight"] == "Q8_0"
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # rows of 80 do not split into blocks of 32
    dense = llamaforge.load(path, dtype=torch.float32, quantize=None)
    kept = llamaforge.load(path)
    assert kept.dtype == torch.bfloat16  # the int8/int4 kernel's activations
    dense_layers = dict(dense.model.named_modules())
    quantized = {name: m for name, m in kept.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 2 * 6 + 1  # every linear but the two 80-wide down projections
    assert isinstance(kept.model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    for name, layer in quantized.items():
        assert (layer.bits, layer.group_size) == ((8, 32) if name == "lm_head" else (bits, 32))
        # The same numbers the dequantizing load computes, q and k rows in the same (HF) order.
        assert torch.equal(layer.dequantize(), dense_layers[name].weight.detach()), name
    # In float32, what is left between the two is the kernel rounding activations to int8 in blocks of 32.
    assert_decodes_like(llamaforge.load(path, dtype=torch.float32), dense,
                        base.tokenizer.encode("The llama hums a quiet song", bos=True))


def assert_decodes_like(kept32: llamaforge.LLM, dense: llamaforge.LLM, ids: list[int], within: float = 0.05) -> None:
    """Decoding `ids` one token at a time (so the int8 / int4 kernel does the work), the kept model's top log
    probabilities stay `within` the dense model's, and a clear choice stays the choice."""
    decoded, reference = [], []
    for position in range(1, len(ids) + 1):  # one token at a time, as decoding runs, so the kernel does the work
        decoded.append(kept32.generate(ids[:position], max_new_tokens=1, temperature=0.0, logprobs=True,
                                       top_logprobs=5).top_logprobs[0])
        reference.append(dense.generate(ids[:position], max_new_tokens=1, temperature=0.0, logprobs=True,
                                        top_logprobs=5).top_logprobs[0])
    for ours, theirs in zip(decoded, reference, strict=True):
        assert all(abs(ours[t] - theirs[t]) < within for t in set(ours) & set(theirs))
        first, second = sorted(theirs.values(), reverse=True)[:2]
        if first - second > 0.1:  # a clear choice stays the choice (a near-tie may flip)
            assert max(ours, key=ours.get) == max(theirs, key=theirs.get)


# Which tensors a Q4_K_M file stores as Q6_K (llama-quantize also keeps some layers' ffn_down in Q4_K).
Q6_K_TENSORS = (".attn_v.weight", ".ffn_down.weight")  # and output.weight


@pytest.fixture(scope="module")
def q4_k_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_path: Path) -> Path:
    """A GGUF laid out as llama.cpp's Q4_K_M (widths of 256 and 512): Q6_K for Q6_K_TENSORS and the output, Q4_K for
    the other 2-D weights; our writer with its encoder swapped for plain quantizers in those layouts (factories)."""
    config = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=512, max_seq_len=128)
    directory = tmp_path_factory.mktemp("q4_k")
    model_dir = write_hf_dir(directory / "model", random_model(config, std=0.05), tiny_tokenizer_path)
    stored_type, encode = gguf_checkpoint._stored_type, gguf_checkpoint._encode
    kinds = gguf.GGMLQuantizationType

    def k_quant_type(gguf_module, name: str, shape: tuple[int, ...], weight_type: str):
        if len(shape) != 2:
            return stored_type(gguf_module, name, shape, weight_type)
        return kinds.Q6_K if name == "output.weight" or name.endswith(Q6_K_TENSORS) else kinds.Q4_K

    def k_quant_bytes(gguf_module, array: np.ndarray, kind):
        factory = {kinds.Q4_K: q4_k_bytes, kinds.Q6_K: q6_k_bytes}.get(kind)
        return encode(gguf_module, array, kind) if factory is None else factory(torch.from_numpy(array)).numpy()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_checkpoint, "_stored_type", k_quant_type)
        patch.setattr(gguf_checkpoint, "_encode", k_quant_bytes)
        return export(llamaforge.load(model_dir, dtype=torch.float32), directory / "model.gguf")


def test_q4_k_m_loads_as_q4_k_and_q6_k_layers_holding_the_files_numbers(q4_k_gguf: Path) -> None:
    """llama.cpp's most used file type runs as stored (Q4_K at 4.625 bits a weight, Q6_K at 6.5625, not int8's 8.5):
    each linear is a layer of its type whose weight is gguf-py's dequantization of the file, q / k rows in HF's
    order; it decodes through the fused layers, and like the dequantized model up to int8 activation rounding."""
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q4_k_gguf).tensors if len(t.shape) == 2}
    assert kinds["blk.0.attn_q.weight"] == "Q4_K" and kinds["blk.1.ffn_down.weight"] == "Q6_K"
    dense = llamaforge.load(q4_k_gguf, dtype=torch.float32, quantize=None)
    tensors = {t.name: t for t in gguf.GGUFReader(q4_k_gguf).tensors}
    for name, weight in [("token_embd.weight", dense.model.model.embed_tokens.weight),
                         ("blk.1.ffn_up.weight", dense.model.model.layers[1].mlp.up_proj.weight),
                         ("blk.1.ffn_down.weight", dense.model.model.layers[1].mlp.down_proj.weight)]:
        expected = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(weight.shape)
        assert torch.equal(weight.detach(), torch.from_numpy(expected)), name
    kept = llamaforge.load(q4_k_gguf)
    dense_layers = dict(dense.model.named_modules())
    quantized = {name: m for name, m in kept.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 2 * 7 + 1
    for name, layer in quantized.items():
        assert layer.kind == ("q6_k" if name.endswith(("v_proj", "down_proj", "lm_head")) else "q4_k"), name
        assert torch.equal(layer.dequantize(), dense_layers[name].weight.detach()), name
    assert kept.model.fused_decode is not None
    prompt = "The llama hums"
    fused = kept.generate(prompt, max_new_tokens=8, temperature=0.0)
    kept.model.fused_decode = None
    assert kept.generate(prompt, max_new_tokens=8, temperature=0.0).token_ids == fused.token_ids
    # Activations round to int8 with one scale for each 256 against k-quants (llama.cpp's Q8_K): in a model 256 wide,
    # one for a whole hidden vector (measured: 0.060 at most; 0.038 with a scale each 32, as int8 / int4 have).
    assert_decodes_like(llamaforge.load(q4_k_gguf, dtype=torch.float32), dense,
                        dense.tokenizer.encode("The llama hums a quiet song", bos=True), within=0.1)


def test_a_q4_k_model_saves_as_a_quantized_checkpoint_and_loads_back(q4_k_gguf: Path, tmp_path: Path) -> None:
    """`llamaforge quantize` of a Q4_K_M GGUF keeps its Q4_K and Q6_K layers (their kinds in config.json), which load
    back with the same codes, scales and mins."""
    out = tmp_path / "quantized"
    assert main(["quantize", "--model", str(q4_k_gguf), "--out", str(out), "--type", "int4"]) == 0
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert layers["model.layers.0.mlp.up_proj"] == {"bits": 4, "group_size": 32, "kind": "q4_k"}
    assert layers["model.layers.0.mlp.down_proj"] == {"bits": 6, "group_size": 16, "kind": "q6_k"}
    direct, loaded = llamaforge.load(q4_k_gguf), llamaforge.load(out)
    for (name, a), (_, b) in zip(direct.model.named_modules(), loaded.model.named_modules(), strict=True):
        if isinstance(a, QuantizedLinear):
            assert b.kind == a.kind and torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), name


def test_the_llama2_vocabulary_survives_the_trip(llama_tokenizer_path: Path, tmp_path: Path) -> None:
    """32000 pieces, scores, byte fallback and whitespace handling: the rebuilt tokenizer is Meta's."""
    config = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, hidden_dim=64, max_seq_len=64)
    model_dir = write_hf_dir(tmp_path / "model", random_model(config), llama_tokenizer_path)
    base = llamaforge.load(model_dir)
    loaded = llamaforge.load(export(base, tmp_path / "model.gguf", "f16"))
    texts = [*TEXTS, "Llamas (Lama glama) are    domesticated South American camelids.", "日本語のテキスト",
             "\u2581already escaped", "<s> is text, not BOS", "\x00\x01 control bytes", " " * 17]
    for text in texts:
        ids = base.tokenizer.encode(text)
        assert loaded.tokenizer.encode(text) == ids, text
        assert loaded.tokenizer.decode(ids) == base.tokenizer.decode(ids), text
    assert (loaded.tokenizer.bos_id, loaded.tokenizer.eos_id) == (1, 2)


def test_stories260k_exported_and_loaded_back_tells_the_same_story(assets: Path, tmp_path: Path) -> None:
    llm = llamaforge.load(assets / "stories260K" / "stories260K.bin")
    path = export(llm, tmp_path / "stories260K.gguf")
    loaded = llamaforge.load(path)
    assert loaded.config.tie_word_embeddings and "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    assert loaded.generate([1], max_new_tokens=200, temperature=0.0).text.encode() == STORIES_GREEDY_200


LLAMA_CPP = """
import json, sys
import llama_cpp
from llama_cpp import Llama
job = json.loads(sys.argv[1])
if job.get("quantize_to"):  # as `llama-quantize model quantize_to TYPE` does, then run that file
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + job["type"])
    assert llama_cpp.llama_model_quantize(job["model"].encode(), job["quantize_to"].encode(), params) == 0
    job["model"] = job["quantize_to"]
model = Llama(model_path=job["model"], n_ctx=512, n_threads=2, verbose=False, logits_all=True)
result = {"encoded": [model.tokenize(text.encode(), add_bos=True) for text in job["texts"]]}
if job.get("generate"):
    tokens = []
    for token in model.generate([model.token_bos()], temp=0.0, top_k=1, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == job["generate"]:
            break
    result |= {"tokens": tokens, "text": model.detokenize(tokens).decode("utf-8", "replace")}
if job.get("logits_of"):
    model.reset()
    model.eval(job["logits_of"])
    result["logits"] = [list(map(float, model.scores[i])) for i in range(len(job["logits_of"]))]
print(json.dumps(result))
"""


def llama_cpp(**job) -> dict:
    done = subprocess.run([LLAMA_CPP_PYTHON, "-c", LLAMA_CPP, json.dumps(job)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


needs_llama_cpp = pytest.mark.skipif(
    not LLAMA_CPP_PYTHON, reason="llama.cpp is not installed here: set LLAMAFORGE_LLAMA_CPP_PYTHON to a python with "
    "llama-cpp-python (../shared/tools/llamacpp-venv.sh builds one)")


@needs_llama_cpp
@pytest.mark.parametrize("weight_type", ["f32", "f16", "q8_0", "q4_0"])
def test_llama_cpp_tells_stories260k_story_from_our_gguf(weight_type: str, assets: Path, tmp_path: Path) -> None:
    llm = llamaforge.load(assets / "stories260K" / "stories260K.bin")
    path = export(llm, tmp_path / "stories260K.gguf", weight_type)
    # tok512 collapses repeated spaces (remove_extra_whitespaces), which llama.cpp's tokenizer never does:
    # these texts have none. Llama 2's own tokenizer keeps them (the next test).
    texts = ["Once upon a time, Lily's mom said: \"hello\"\n", "The end."]
    result = llama_cpp(model=str(path), generate=200, texts=texts)
    assert result["encoded"] == [llm.tokenizer.encode(text, bos=True) for text in texts]
    if weight_type == "f32":
        assert result["tokens"] == llm.generate([1], max_new_tokens=200, temperature=0.0).token_ids
        assert result["text"].encode() == b" " + STORIES_GREEDY_200  # llama.cpp keeps the dummy-prefix space
    else:  # rounded weights, which llamaforge loads back: the same story for as long as no near-tie flips
        ours = llamaforge.load(path, dtype=torch.float32).generate([1], max_new_tokens=200, temperature=0.0)
        same = next((i for i, (a, b) in enumerate(zip(result["tokens"], ours.token_ids, strict=True)) if a != b), 200)
        print(f"{weight_type}: llama.cpp and llamaforge agree on the first {same} of 200 greedy tokens")
        assert same >= 50


@needs_llama_cpp
def test_llama_cpp_reads_the_llama2_vocabulary_and_weights_as_we_do(llama_tokenizer_path: Path,
                                                                    tmp_path: Path) -> None:
    config = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=128, max_seq_len=128)
    llm = llamaforge.load(write_hf_dir(tmp_path / "model", random_model(config, std=0.1), llama_tokenizer_path))
    path = export(llm, tmp_path / "model.gguf")
    texts = [text for text in TEXTS if text] + ["Llamas are    domesticated camelids.", "日本語 🦙 ok"]
    ids = llm.tokenizer.encode("[INST] Tell me about llamas. [/INST]", bos=True)
    result = llama_cpp(model=str(path), texts=texts, logits_of=ids)
    assert result["encoded"] == [llm.tokenizer.encode(text, bos=True) for text in texts]
    theirs, ours = torch.tensor(result["logits"]), logits(llm, ids)
    # llama.cpp keeps its KV cache in float16 and sums in its own order: close, not bit-equal.
    torch.testing.assert_close(theirs, ours, rtol=0, atol=5e-3)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_export_command_and_its_errors(gqa_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "model.gguf"
    assert main(["export", "--model", str(gqa_model_dir), "--out", str(out), "--type", "q8_0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "type": "q8_0", "bytes": out.stat().st_size}
    assert gguf.GGUFReader(out).fields["tokenizer.chat_template"].contents() == JINJA_TEMPLATE
    assert main(["generate", "--model", str(out), "The llama", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    capsys.readouterr()
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"GGUF" + b"\x00" * 20)
    for args, message in [
        (["--out", str(out)], f"--out {out}: give a new file name ending in .gguf"),
        (["--out", str(tmp_path / "model.bin")], f"--out {tmp_path / 'model.bin'}: give a new file name"),
        (["--out", str(tmp_path / "m.gguf"), "--type", "q4_k"], "--type q4_k: choose one of f32, f16, bf16, q8_0"),
    ]:
        assert main(["export", "--model", str(gqa_model_dir), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + message) and err.count("\n") == 1, err
    assert main(["generate", "--model", str(not_gguf), "hi"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {not_gguf} is not a readable GGUF file")
    assert not list(tmp_path.glob(".*partial"))


def test_a_gguf_of_another_architecture_is_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="holds a 'falcon' model; llamaforge runs Llama 2"):
        llamaforge.load(tmp_path / "falcon.gguf")


def test_export_needs_the_sentencepiece_tokenizer(gqa_model_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    hf_only = tmp_path / "hf-only"
    hf_only.mkdir()
    for file in ("config.json", "model.safetensors"):
        (hf_only / file).write_bytes((gqa_model_dir / file).read_bytes())
    vocab = {f"t{i}": i for i in range(400)}
    HFTokenizer(WordLevel(vocab, unk_token="t0")).save(str(hf_only / "tokenizer.json"))
    llm = llamaforge.load(hf_only)
    with pytest.raises(TokenizerError, match="is an HF tokenizer.json; this needs the SentencePiece tokenizer.model"):
        export(llm, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_a_gguf_loaded_model_saves_as_an_hf_folder_with_its_tokenizer(gqa_model_dir: Path, tmp_path: Path) -> None:
    from llamaforge.checkpoint.hf import save_hf_dir

    loaded = llamaforge.load(export(llamaforge.load(gqa_model_dir), tmp_path / "model.gguf"))
    out = save_hf_dir(loaded.model.state_dict(), loaded.config, tmp_path / "hf", loaded.tokenizer)
    again = llamaforge.load(out)
    assert again.tokenizer.path.name == "tokenizer.model"
    assert again.tokenizer.encode("The llama hums") == loaded.tokenizer.encode("The llama hums")
    ids = loaded.tokenizer.encode("The llama hums", bos=True)
    torch.testing.assert_close(logits(again, ids), logits(loaded, ids))


@pytest.mark.parametrize("kind", ["Q5_0", "Q4_1"])
def test_other_quantized_types_load_as_int8_close_to_their_values(tmp_path: Path, tiny_tokenizer_path: Path,
                                                                  monkeypatch, kind: str) -> None:
    """A block type the kernel does not run as stored (Q5_0, Q4_1) loads as an int8 layer in groups of 32, within
    half an int8 step of the values the file stores; it never becomes a 16-bit copy."""
    import llamaforge.checkpoint.gguf as gguf_module

    config = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=512, max_seq_len=64)
    model_dir = write_hf_dir(tmp_path / "model", random_model(config, std=0.05), tiny_tokenizer_path)
    stored_type = gguf_module._stored_type

    def stored_as_kind(gguf_, name, shape, weight_type):  # norms stay float32; gguf-py's quantizer encodes the rest
        return getattr(gguf.GGMLQuantizationType, kind) if len(shape) == 2 else stored_type(gguf_, name, shape,
                                                                                            weight_type)

    monkeypatch.setattr(gguf_module, "_stored_type", stored_as_kind)
    path = export(llamaforge.load(model_dir), tmp_path / "model.gguf")
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2} == {kind}
    dense = llamaforge.load(path, dtype=torch.float32, quantize=None)
    kept = llamaforge.load(path)
    assert kept.dtype == torch.bfloat16
    dense_layers = dict(dense.model.named_modules())
    quantized = {name: m for name, m in kept.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 7 + 1  # every linear, the output projection included
    for name, layer in quantized.items():
        assert (layer.bits, layer.group_size) == (8, 32), name
        stored = dense_layers[name].weight.detach()  # the file's values, q and k rows in HF's order
        step = layer.weight_q.row_scales().float().repeat_interleave(32, dim=1)
        # Half a step, plus up to 127 times the float16 rounding of the scale (relative 2**-11, but at least half
        # float16's subnormal spacing, 2**-25, for the smallest scales).
        bound = step * 0.5 + 127 * torch.clamp(step * 2**-11, min=2**-25) + 1e-9
        assert bool(((layer.dequantize() - stored).abs() <= bound).all()), name
    ids = kept.tokenizer.encode("The llama hums", bos=True)
    ours, reference = logits(kept, ids), logits(dense, ids)  # bfloat16 and int8 activations against float32
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()


@needs_llama_cpp
@pytest.mark.parametrize(("file_type", "kinds"), [("Q4_K_M", {"q4_k", "q6_k"}), ("Q5_K_M", {"q5_k", "q6_k"})])
def test_llama_cpps_own_k_quant_file_runs_as_stored_with_llama_cpps_logits(tmp_path: Path, tiny_tokenizer_path: Path,
                                                                          file_type: str, kinds: set[str]) -> None:
    """llama.cpp's quantizer makes a Q4_K_M / Q5_K_M file (its own choice of k-quant a tensor); llamaforge runs its
    linears as stored and, teacher-forced, gives llama.cpp's logits on the file up to rounding (both round activations
    to int8 in blocks of 256, as llama.cpp's Q8_K, but llama.cpp's repacked kernels quantize them their own way and
    keep its KV cache in float16; measured on Q4_K_M: mean difference 0.015 on logits up to 3.4, each side 0.016 from
    the dequantized file's)."""
    config = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=512, max_seq_len=128)
    model_dir = write_hf_dir(tmp_path / "model", random_model(config, std=0.05), tiny_tokenizer_path)
    f16 = export(llamaforge.load(model_dir, dtype=torch.float32), tmp_path / "model.gguf", "f16")
    ids = llamaforge.load(model_dir).tokenizer.encode("The llama hums a quiet song", bos=True)
    path = tmp_path / f"model.{file_type}.gguf"
    theirs = torch.tensor(llama_cpp(model=str(f16), quantize_to=str(path), type=file_type, texts=[],
                                    logits_of=ids)["logits"])
    kept = llamaforge.load(path, dtype=torch.float32)
    assert {m.kind for m in kept.model.modules() if isinstance(m, QuantizedLinear)} == kinds
    dense = llamaforge.load(path, dtype=torch.float32, quantize=None)
    ours, exact = logits(kept, ids), logits(dense, ids)
    scale = exact.abs().max()
    # Ours rounds as much as llama.cpp's own does, no more (measured: 0.0161 and 0.0164 on Q4_K_M).
    assert (ours - exact).abs().mean() < 1.2 * (theirs - exact).abs().mean()
    assert (ours - theirs).abs().max() < 0.04 * scale and (ours - theirs).abs().mean() < 0.01 * scale


@pytest.mark.parametrize("weight_type", ["f16", "q8_0"])
def test_export_encodes_one_tensor_at_a_time(tmp_path: Path, tiny_tokenizer_path: Path, weight_type: str) -> None:
    """The writer holds one encoded tensor at a time, not the whole file (a 7B model's F16 file held in memory
    beside the model doubled what exporting needed): numpy's allocations while writing (tracemalloc sees them) stay
    under a quarter of the file, whose largest tensor is under a thirtieth of it (gguf-py's Q8_0 quantizer makes a
    few float32 copies of the tensor it encodes); and each tensor lands in its own place."""
    import tracemalloc

    config = ModelArgs(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=512, max_seq_len=64)
    model_dir = write_hf_dir(tmp_path / "model", random_model(config, std=0.05), tiny_tokenizer_path)
    llm = llamaforge.load(model_dir, dtype=torch.float32)
    first = export(llm, tmp_path / "first.gguf", weight_type)  # imports what the writer uses, before tracing
    tracemalloc.start()
    try:
        path = export(llm, tmp_path / "model.gguf", weight_type)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size / 4, (peak, path.stat().st_size)
    assert path.read_bytes() == first.read_bytes()
    loaded = llamaforge.load(path, dtype=torch.float32, quantize=None).model.state_dict()
    for name, weight in llm.model.state_dict().items():
        if weight.ndim == 1:
            assert torch.equal(loaded[name], weight), name
        elif weight_type == "f16":
            assert torch.equal(loaded[name], weight.half().float()), name
        else:  # Q8_0: within half a step of each 32-weight block's scale (plus its float16 rounding)
            step = weight.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
            error = (loaded[name].reshape(-1, 32) - weight.reshape(-1, 32)).abs()
            assert bool((error <= step * (0.5 + 127 * 2**-11) + 1e-9).all()), name
