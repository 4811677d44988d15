"""Damaged and hostile checkpoint files: each is refused before a model is built, in one line that names the file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from factories import random_model, write_hf_dir
from safetensors.torch import load_file, save_file
from test_checkpoint import write_meta_dir

import llamaforge
from llamaforge.config import PRESETS, ModelArgs
from llamaforge.errors import CheckpointError
from llamaforge.model import Llama

HUGE = 2**30


def forbid_models(monkeypatch: pytest.MonkeyPatch, more_layers_than: int = 0) -> None:
    """From now on, building a model of more layers fails at once: the tiny checkpoints hold 2, and a model of
    2**30 would take minutes; with the default 0, the error must come from reading the files alone."""
    original = Llama.__init__

    def guarded(self: Llama, config: ModelArgs) -> None:
        if config.n_layers > more_layers_than:
            raise AssertionError(f"a {config.n_layers}-layer model was built before the checkpoint was checked")
        original(self, config)

    monkeypatch.setattr(Llama, "__init__", guarded)


@pytest.fixture
def model_dir(tmp_path: Path, tiny_config: ModelArgs) -> Path:
    return write_hf_dir(tmp_path / "m", random_model(tiny_config))


def load_error(source: Path, **options) -> str:
    """The message of the CheckpointError loading `source` raises, checked to be one line, free of warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torch warning printed before the error is a failure too
        with pytest.raises(CheckpointError) as error:
            llamaforge.load(source, device="cpu", **options)
    message = str(error.value)
    assert "\n" not in message
    return message


def edit_config(directory: Path, name: str = "config.json", **changes) -> Path:
    config = directory / name
    config.write_text(json.dumps(json.loads(config.read_text()) | changes))
    return config


# --- a config that claims more than the weights hold ---------------------------------------------------

@pytest.mark.parametrize("layout", ["single", "sharded", "pytorch_bin"])
def test_hf_config_claiming_2_30_layers(tmp_path: Path, tiny_config: ModelArgs, monkeypatch: pytest.MonkeyPatch,
                                        layout: str) -> None:
    model = random_model(tiny_config)
    directory = write_hf_dir(tmp_path / "m", model, shards=3 if layout == "sharded" else 1)
    if layout == "pytorch_bin":
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    config = edit_config(directory, num_hidden_layers=HUGE)
    forbid_models(monkeypatch, more_layers_than=2)
    message = load_error(directory)
    weights = {"single": f"{directory / 'model.safetensors'} holds",
               "sharded": f"the 3 weight files in {directory} hold",
               "pytorch_bin": f"{directory / 'pytorch_model.bin'} holds"}[layout]
    assert message == (f"{config} says num_hidden_layers={HUGE} but {weights} layers 0-1; the config does not match "
                       "the weights (use the config file that came with them)")


def test_meta_params_claiming_2_30_layers(tmp_path: Path, tiny_config: ModelArgs, tiny_tokenizer_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(tiny_config.replace(hidden_dim=192))  # multiple_of 32 turns dim 64 into 192
    directory = write_meta_dir(tmp_path / "llama-2-tiny", model, shards=2, tokenizer=tiny_tokenizer_path)
    params = edit_config(directory, "params.json", n_layers=HUGE)
    forbid_models(monkeypatch, more_layers_than=2)
    message = load_error(directory)
    assert message.startswith(f"{params} says n_layers={HUGE} but the 2 weight files in {directory} hold layers 0-1")


def test_meta_shard_lacking_a_tensor(tmp_path: Path, tiny_config: ModelArgs, tiny_tokenizer_path: Path) -> None:
    model = random_model(tiny_config.replace(hidden_dim=192))
    directory = write_meta_dir(tmp_path / "llama-2-tiny", model, shards=2, tokenizer=tiny_tokenizer_path)
    second = directory / "consolidated.01.pth"
    state = torch.load(second)
    del state["layers.1.attention.wk.weight"]
    torch.save(state, second)
    message = load_error(directory)
    assert f"{second} lacks layers.1.attention.wk.weight, which {directory / 'consolidated.00.pth'} holds" in message


def test_gguf_claiming_2_30_layers(tmp_path: Path, tiny_config: ModelArgs, tiny_tokenizer_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    from llamaforge.checkpoint.gguf import write_gguf
    from llamaforge.tokenizer import Tokenizer

    model = random_model(tiny_config)
    path = write_gguf(model.state_dict(), tiny_config.replace(n_layers=HUGE), Tokenizer(tiny_tokenizer_path),
                      tmp_path / "model.gguf", "f32")
    forbid_models(monkeypatch, more_layers_than=2)
    assert load_error(path) == (f"{path} says llama.block_count={HUGE} but {path} holds layers 0-1; the config "
                                "does not match the weights (use the config file that came with them)")


def llama2c_bytes(config: ModelArgs, header_layers: int) -> bytes:
    """A llama2.c version-0 file (shared classifier) of random weights, its header claiming `header_layers`."""
    d, h, n, kv = config.dim, config.hidden_dim, config.n_layers, config.n_kv_heads * config.head_dim
    floats = config.vocab_size * d + n * (2 * d + 2 * d * d + 2 * kv * d + 3 * h * d) + d
    floats += config.max_seq_len * config.head_dim  # the RoPE tables llama2.c stores, real and imaginary halves
    header = struct.pack("<7i", d, h, header_layers, config.n_heads, config.n_kv_heads, config.vocab_size,
                         config.max_seq_len)
    return header + torch.randn(floats).numpy().tobytes()


def test_llama2c_header_claiming_2_30_layers(tmp_path: Path, tiny_config: ModelArgs, tiny_tokenizer_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_bytes(llama2c_bytes(tiny_config, tiny_config.n_layers))
    bad.write_bytes(llama2c_bytes(tiny_config, HUGE))
    assert llamaforge.load(good, tokenizer=tiny_tokenizer_path).config.n_layers == 2
    forbid_models(monkeypatch, more_layers_than=2)
    message = load_error(bad, tokenizer=tiny_tokenizer_path)
    assert message.startswith(f"{bad} has {good.stat().st_size} bytes but its header describes ")
    assert "truncated or not a llama2.c version-0 checkpoint" in message


# --- config files that are not a config ----------------------------------------------------------------

@pytest.mark.parametrize(("content", "problem"), [
    (b"[1, 2, 3]", "holds a JSON array where a JSON object belongs"),
    (b'"hidden_size"', "holds a JSON string where a JSON object belongs"),
    (b"4096", "holds a JSON number where a JSON object belongs"),
    (b"{hidden_size: 64", "is not valid JSON"),
    (b"\xff\xfe\x00garbage\x89PNG", "is not valid JSON"),
    (b"[" * 100_000, "is not valid JSON"),
])
def test_config_json_that_is_not_an_object(model_dir: Path, monkeypatch: pytest.MonkeyPatch, content: bytes,
                                           problem: str) -> None:
    (model_dir / "config.json").write_bytes(content)
    forbid_models(monkeypatch)
    assert load_error(model_dir).startswith(f"{model_dir / 'config.json'} {problem}")


@pytest.mark.parametrize(("changes", "problem"), [
    ({"vocab_size": 0}, "vocab_size=0 but it must be a positive integer"),
    ({"hidden_size": -64}, "hidden_size=-64 but it must be a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0 but it must be a positive integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers=True but it must be a positive integer"),
    ({"intermediate_size": 1.5}, "intermediate_size=1.5 but it must be a positive integer"),
    ({"max_position_embeddings": "4096"}, "max_position_embeddings='4096' but it must be a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 but it must be a positive integer"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 but it must be a divisor of num_attention_heads (4)"),
    ({"num_attention_heads": 64, "num_key_value_heads": 64},
     "hidden_size=64 but it must be an even multiple of num_attention_heads (64)"),
    ({"hidden_size": 66}, "hidden_size=66 but it must be an even multiple of num_attention_heads (4)"),
    ({"rms_norm_eps": 0}, "rms_norm_eps=0 but it must be a positive number"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps='1e-5' but it must be a positive number"),
    ({"rope_theta": float("inf")}, "rope_theta=inf but it must be a positive number"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false' but it must be true or false"),
    ({"eos_token_id": -1}, "eos_token_id=-1 but it must be a non-negative integer"),
    ({"rope_scaling": [2.0]}, "rope_scaling=[2.0] but it must be an object like"),
    ({"rope_parameters": "linear"}, "rope_parameters='linear' but it must be an object like"),
    ({"rope_scaling": {"type": "linear", "factor": "big"}}, "rope_scaling factor must be a number >= 1.0"),
])
def test_config_values_out_of_range(model_dir: Path, monkeypatch: pytest.MonkeyPatch, changes: dict,
                                    problem: str) -> None:
    config = edit_config(model_dir, **changes)
    forbid_models(monkeypatch)
    message = load_error(model_dir)
    assert message.startswith(f"{config} says {problem}") or message.startswith(f"{config}: {problem}"), message


def test_model_args_refuse_impossible_shapes() -> None:
    with pytest.raises(CheckpointError, match="^vocab_size=0 but it must be a positive integer$"):
        ModelArgs(vocab_size=0)
    with pytest.raises(CheckpointError, match=r"^n_kv_heads=5 but it must be a divisor of n_heads \(32\)$"):
        ModelArgs(n_kv_heads=5)
    assert all(preset.replace().num_parameters() > 0 for preset in PRESETS.values())


def test_gguf_metadata_out_of_range_names_its_key(tmp_path: Path, tiny_config: ModelArgs,
                                                  tiny_tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    from llamaforge.checkpoint.gguf import write_gguf
    from llamaforge.tokenizer import Tokenizer

    model = random_model(tiny_config)
    config = tiny_config.replace()
    config.hidden_dim = 0  # past ModelArgs' own check, as a hostile writer would be
    path = write_gguf(model.state_dict(), config, Tokenizer(tiny_tokenizer_path), tmp_path / "model.gguf", "f32")
    forbid_models(monkeypatch)
    assert load_error(path).startswith(f"{path} says llama.feed_forward_length=0 but it must be a positive integer")


def test_hf_dtype_that_is_not_a_float_type_is_ignored(model_dir: Path) -> None:
    edit_config(model_dir, torch_dtype="nn")
    assert llamaforge.load(model_dir).dtype == torch.float32


def test_index_whose_weight_map_is_not_a_mapping(tmp_path: Path, tiny_config: ModelArgs) -> None:
    directory = write_hf_dir(tmp_path / "m", random_model(tiny_config), shards=2)
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
    assert load_error(directory).startswith(f"{index} has no weight_map")


# --- weight files that are damaged ---------------------------------------------------------------------

def damage(weights: Path, how: str) -> None:
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "garbage header":
        weights.write_bytes(struct.pack("<Q", 12) + b"not json at all" + data[27:])
    else:  # a header length past the end of the file
        weights.write_bytes(struct.pack("<Q", 2**62) + data[8:])


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage header", "huge header length"])
def test_damaged_safetensors(model_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    weights = model_dir / "model.safetensors"
    damage(weights, how)
    forbid_models(monkeypatch)
    assert load_error(model_dir).startswith(f"{weights} is truncated or corrupt")


def test_damaged_shard_is_named(tmp_path: Path, tiny_config: ModelArgs, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_hf_dir(tmp_path / "m", random_model(tiny_config), shards=2)
    shard = directory / "model-00002-of-00002.safetensors"
    damage(shard, "truncated")
    forbid_models(monkeypatch)
    assert load_error(directory).startswith(f"{shard} is truncated or corrupt")


def rewrite_weights(directory: Path, change) -> Path:
    weights = directory / "model.safetensors"
    state = load_file(weights)
    change(state)
    save_file(state, weights)
    return weights


def test_tensor_with_the_wrong_shape(model_dir: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    weights = rewrite_weights(model_dir, lambda state: state.update({name: state[name][:8].clone()}))
    assert load_error(model_dir) == (
        f"tensor {name} has shape (8, 64) but the config asks for (32, 64): {model_dir / 'config.json'} does not "
        f"match the weights in {weights}; use the config file that came with them"
    )


def test_missing_tensor(model_dir: Path) -> None:
    weights = rewrite_weights(model_dir, lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    assert load_error(model_dir).startswith(
        f"{weights} lacks 1 tensors the model needs, e.g. model.layers.1.mlp.up_proj.weight; "
    )


def test_unexpected_tensor(model_dir: Path) -> None:
    weights = rewrite_weights(model_dir, lambda state: state.update({"model.layers.0.self_attn.q_proj.bias":
                                                                     torch.zeros(64)}))
    assert load_error(model_dir).startswith(
        f"{weights} holds tensors a Llama model does not: model.layers.0.self_attn.q_proj.bias"
    )


def test_integer_weights(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    del config["torch_dtype"]  # else the weights are cast to it as they are read
    (model_dir / "config.json").write_text(json.dumps(config))
    name = "model.norm.weight"
    rewrite_weights(model_dir, lambda state: state.update({name: state[name].to(torch.int8)}))
    assert load_error(model_dir).startswith(f"tensor {name} is stored as torch.int8")


def test_pickle_that_is_not_a_state_dict(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (model_dir / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], model_dir / "pytorch_model.bin")
    forbid_models(monkeypatch)
    assert load_error(model_dir).startswith(f"{model_dir / 'pytorch_model.bin'} does not hold a state dict")


# --- the command line ----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage_name", ["config array", "2**30 layers"])
def test_cli_prints_one_line(model_dir: Path, damage_name: str) -> None:
    if damage_name == "config array":
        (model_dir / "config.json").write_text("[]")
    else:
        edit_config(model_dir, num_hidden_layers=HUGE)
    result = subprocess.run([sys.executable, "-m", "llamaforge", "generate", "--model", str(model_dir), "hi"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {model_dir / 'config.json'} ")
    assert result.stderr.count("\n") == 1
