"""Loading every checkpoint format, the reference assets, the hub cache, and errors for bad files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import random_model, write_hf_dir

import llamaforge
from llamaforge.checkpoint.keymaps import HF_TO_META, rename
from llamaforge.config import ModelArgs
from llamaforge.errors import CheckpointError, TokenizerError

STORIES_GREEDY_200 = (
    b'Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw '
    b'a big, red ball. She wanted to play with it, but it was too high.\nLily\'s mom said, "Lily, let\'s go to the '
    b'park." Lily was sad and didn\'t know what to do. She said, "I want to play with your ball, but I can\'t find '
    b'it."\nLily was sad and didn\'t know what to do. She said, "I\'m sorry, Lily. I didn\'t know what to do."\nLily '
    b"didn't want to help her mom, so she"
)
PROBE = torch.tensor([[1, 17, 99, 3, 250, 7, 42, 42, 8]])


def logits(llm: llamaforge.LLM, input_ids: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(input_ids.to(llm.device))


# --- reference assets --------------------------------------------------------------------------------

def test_stories260k_greedy_matches_llama2c(assets: Path) -> None:
    llm = llamaforge.load(assets / "stories260K" / "stories260K.bin")
    assert llm.format == "llama2c" and llm.tokenizer.path.name == "tok512.model"
    out = llm.generate([1], max_new_tokens=200, temperature=0.0)
    assert out.text.encode() == STORIES_GREEDY_200
    assert len(out.token_ids) == 200


def test_stories260k_with_its_bin_tokenizer(assets: Path) -> None:
    llm = llamaforge.load(assets / "stories260K" / "stories260K.bin", tokenizer=assets / "stories260K" / "tok512.bin")
    assert llm.generate([1], max_new_tokens=200, temperature=0.0).text.encode() == STORIES_GREEDY_200


def test_tiny_random_llama2_reproduces_reference_logits(assets: Path) -> None:
    directory = assets / "tiny-random-llama-2"
    reference = json.loads((directory / "reference_corpus.json").read_text())
    llm = llamaforge.load(directory, dtype=torch.float32)
    assert llm.format == "hf" and llm.tokenizer is None
    tolerance = reference["logit_tolerance"]
    for case in reference["model_cases"]:
        last = logits(llm, torch.tensor([case["input_ids"]]))[0, -1]
        ids = [int(i) for i in case["sampled_logits"]]
        expected = torch.tensor(list(case["sampled_logits"].values()))
        torch.testing.assert_close(last[ids], expected, atol=tolerance["absolute"], rtol=tolerance["relative"])
        assert last.argmax().item() == case["greedy_token"]
        out = llm.generate(case["input_ids"], max_new_tokens=4, temperature=0.0, ignore_eos=True)
        assert out.token_ids == case["greedy_continuation"]


def test_stored_dtype_is_the_default(assets: Path) -> None:
    assert llamaforge.load(assets / "tiny-random-llama-2").dtype == torch.bfloat16


# --- HF directories ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_model(tiny_config: ModelArgs) -> torch.nn.Module:
    return random_model(tiny_config, seed=3)


def test_hf_single_sharded_and_bin_load_the_same(tmp_path: Path, reference_model, tiny_tokenizer_path: Path) -> None:
    with torch.no_grad():
        expected = reference_model(PROBE)
    single = write_hf_dir(tmp_path / "single", reference_model, tiny_tokenizer_path)
    sharded = write_hf_dir(tmp_path / "sharded", reference_model, tiny_tokenizer_path, shards=3)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(single / "config.json", pickled / "config.json")
    torch.save(reference_model.state_dict(), pickled / "pytorch_model.bin")
    for directory in (single, sharded, pickled):
        llm = llamaforge.load(directory, dtype="float32")
        torch.testing.assert_close(logits(llm), expected, atol=0, rtol=0)
    assert llamaforge.load(sharded).tokenizer.vocab_size == 400


def test_cast_to_bfloat16_on_load(tmp_path: Path, reference_model) -> None:
    llm = llamaforge.load(write_hf_dir(tmp_path / "m", reference_model), dtype=torch.bfloat16)
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}


def test_tied_embeddings(tmp_path: Path, tiny_config: ModelArgs) -> None:
    model = random_model(tiny_config.replace(tie_word_embeddings=True))
    llm = llamaforge.load(write_hf_dir(tmp_path / "tied", model))
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight
    torch.testing.assert_close(logits(llm), model(PROBE).detach())


# --- Meta layout -------------------------------------------------------------------------------------

def hf_to_meta_permutation(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows back to Meta's interleaved pairs (the inverse of HF's convert_llama_weights_to_hf)."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def write_meta_dir(directory: Path, model: torch.nn.Module, shards: int, tokenizer: Path) -> Path:
    """Meta's download layout, split into `shards` model-parallel parts like Meta's 13B and 70B."""
    config = model.config
    directory.mkdir(parents=True)
    parts: list[dict] = [{} for _ in range(shards)]
    for name, tensor in model.state_dict().items():
        meta_name = rename(name, HF_TO_META)
        if name.endswith("q_proj.weight"):
            tensor = hf_to_meta_permutation(tensor, config.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = hf_to_meta_permutation(tensor, config.n_kv_heads)
        dim = META_SPLIT.get(meta_name.split(".")[-2])
        pieces = tensor.chunk(shards, dim=dim) if dim is not None else [tensor] * shards
        for part, piece in zip(parts, pieces, strict=True):
            part[meta_name] = piece.clone().to(torch.bfloat16)
    for index, part in enumerate(parts):
        part["rope.freqs"] = torch.zeros(config.head_dim // 2)
        torch.save(part, directory / f"consolidated.{index:02d}.pth")
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "multiple_of": 32, "norm_eps": config.norm_eps, "vocab_size": -1}
    (directory / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer, directory.parent / "tokenizer.model")  # Meta keeps it beside the size folders
    return directory


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_meta_two_shards_equal_hf_layout(tmp_path: Path, tiny_tokenizer_path: Path, n_kv_heads: int) -> None:
    # multiple_of 32 turns dim 64 into Meta's SwiGLU size 192.
    config = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=400, hidden_dim=192,
                       max_seq_len=4096)
    model = random_model(config, seed=5).to(torch.bfloat16).float()  # values exactly representable in bf16
    meta_dir = write_meta_dir(tmp_path / "llama-2-tiny", model, shards=2, tokenizer=tiny_tokenizer_path)
    hf_dir = write_hf_dir(tmp_path / "hf", model, tiny_tokenizer_path)
    meta_llm, hf_llm = llamaforge.load(meta_dir, dtype="float32"), llamaforge.load(hf_dir, dtype="float32")
    assert meta_llm.format == "meta" and meta_llm.config.hidden_dim == 192
    assert meta_llm.tokenizer is not None
    torch.testing.assert_close(logits(meta_llm), logits(hf_llm), atol=0, rtol=0)
    assert llamaforge.load(meta_dir).dtype == torch.bfloat16


# --- hub ---------------------------------------------------------------------------------------------

def make_hub_cache(hf_home: Path, repo_id: str, files_from: Path) -> None:
    """The layout huggingface_hub keeps under HF_HOME/hub, as if `hf download` had run."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, file in enumerate(sorted(files_from.iterdir())):
        blob = blobs / f"{index:040d}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamaforge", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_hub_repo_id_loads_from_the_offline_cache(tmp_path: Path, tiny_model_dir: Path) -> None:
    make_hub_cache(tmp_path / "hf-home", "someone/tiny-llama-2", tiny_model_dir)
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("info", "--model", "someone/tiny-llama-2", "--json", env=env)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "hf" and info["parameters"] == llamaforge.load(tiny_model_dir).config.num_parameters()
    missing = run_cli("info", "--model", "meta-llama/Llama-2-7b-chat-hf", env=env)
    assert missing.returncode == 2
    assert "not in the local hub cache" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
    assert "Traceback" not in missing.stderr


# --- errors ------------------------------------------------------------------------------------------

def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist; pass an HF directory"):
        llamaforge.load(tmp_path / "nowhere")


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint llamaforge recognises"):
        llamaforge.load(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint llamaforge recognises"):
        llamaforge.load(tmp_path / "notes.txt")


def test_truncated_safetensors(tmp_path: Path, reference_model) -> None:
    directory = write_hf_dir(tmp_path / "m", reference_model)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt.*download it again"):
        llamaforge.load(directory)


def test_truncated_llama2c(tmp_path: Path, assets: Path) -> None:
    truncated = tmp_path / "stories.bin"
    truncated.write_bytes((assets / "stories260K" / "stories260K.bin").read_bytes()[:500_000])
    with pytest.raises(CheckpointError, match="header describes 1056540"):
        llamaforge.load(truncated, tokenizer=assets / "stories260K" / "tok512.model")


def test_missing_shard(tmp_path: Path, reference_model) -> None:
    directory = write_hf_dir(tmp_path / "m", reference_model, shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors; finish the download"):
        llamaforge.load(directory)


def test_config_that_does_not_match_weights(tmp_path: Path, reference_model) -> None:
    directory = write_hf_dir(tmp_path / "m", reference_model)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"intermediate_size": 100}))
    expected = r"mlp.down_proj.weight has shape \(64, 128\) but the config asks for \(64, 100\)"
    with pytest.raises(CheckpointError, match=expected):
        llamaforge.load(directory)


def test_tokenizer_vocab_must_match_model(tmp_path: Path, tiny_config: ModelArgs, tiny_tokenizer_path: Path) -> None:
    model = random_model(tiny_config.replace(vocab_size=512))
    directory = write_hf_dir(tmp_path / "m", model, tiny_tokenizer_path)
    with pytest.raises(TokenizerError, match="has 400 tokens but the model has 512 embedding rows"):
        llamaforge.load(directory)


def test_unsupported_rope_scaling(tmp_path: Path, reference_model) -> None:
    directory = write_hf_dir(tmp_path / "m", reference_model)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"rope_scaling": {"type": "yarn", "factor": 4}}))
    with pytest.raises(CheckpointError, match="rope_scaling type 'yarn' is not supported"):
        llamaforge.load(directory)


def test_a_missing_demo_model_says_how_to_get_it_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import llamaforge.checkpoint

    monkeypatch.setattr(llamaforge.checkpoint, "DEMO_DIR", tmp_path / "demo")
    with pytest.raises(CheckpointError, match="demo model is missing from this install.*recipes/demo/run.py"):
        llamaforge.load()


@pytest.mark.parametrize(("error_name", "status", "message"), [
    ("GatedRepoError", 403, r"is gated: accept its licence on https://huggingface.co/meta-llama/Llama-2-7b-hf.*HF_TOKEN"),
    ("RepositoryNotFoundError", 404, "was not found on the hub"),
])
def test_hub_errors_say_what_to_do(monkeypatch: pytest.MonkeyPatch, error_name: str, status: int,
                                   message: str) -> None:
    """The hub's own exception types, raised as huggingface_hub raises them for a refused download."""
    import huggingface_hub
    import huggingface_hub.errors as hub_errors

    # The HTTP library whose errors the hub's subclass (httpx for hub 1.x, httpx2 for 2.x).
    httpx = pytest.importorskip(hub_errors.HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    request = httpx.Request("GET", "https://huggingface.co/api/models/meta-llama/Llama-2-7b-hf")
    error = getattr(hub_errors, error_name)("refused", response=httpx.Response(status, request=request))

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(CheckpointError, match=message):
        llamaforge.load("meta-llama/Llama-2-7b-hf")
