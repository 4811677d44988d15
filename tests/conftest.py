"""Shared fixtures: the assets folder (skipped with a reason when absent), a trained tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import SHARED_ASSETS, random_model, train_tokenizer, write_hf_dir

from llamaforge.config import ModelArgs

# The tests run tiny models: one thread is fastest, and avoids OpenMP thrashing when the cores are busy.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def assets() -> Path:
    """../shared/assets beside the clone; tests that need it skip in a user's fresh clone."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"test assets not found at {SHARED_ASSETS} (they live outside the repository)")
    return SHARED_ASSETS


@pytest.fixture(scope="session")
def llama_tokenizer_path(assets: Path) -> Path:
    return assets / "llama2-tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_config() -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=128, max_seq_len=128)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_config: ModelArgs, tiny_tokenizer_path: Path) -> Path:
    """An HF directory with a random GQA model and the trained tokenizer."""
    return write_hf_dir(tmp_path_factory.mktemp("tiny") / "model", random_model(tiny_config), tiny_tokenizer_path)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir: Path):
    import llamaforge

    return llamaforge.load(tiny_model_dir)


@pytest.fixture(scope="module")
def live_server(tiny_llm):
    """The tiny model served on a loopback port: 4 slots, a queue of 64."""
    pytest.importorskip("fastapi")
    from factories import LiveServer

    from llamaforge.engine import Engine
    from llamaforge.server import create_app

    engine = Engine(tiny_llm, max_batch_size=4, max_queue=64, prefill_chunk=16)
    with LiveServer(create_app(tiny_llm, engine, model_name="tiny")) as server:
        server.engine = engine
        yield server
