"""Builders for tiny models, tokenizers and checkpoint directories written on the fly."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llamaforge.config import ModelArgs
from llamaforge.model import Llama, init_weights

SHARED_ASSETS = Path(os.environ.get("LLAMAFORGE_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))

CORPUS = [
    "Once upon a time there was a small llama who liked to count: 1, 2, 3, 42, 1234.",
    "The quick brown fox jumps over the lazy dog. Café, naïve, jalapeño, Zürich.",
    "Llamas live in the Andes; they carry loads and hum when they are happy.",
    "def generate(prompt):\n    return model(prompt)  # code has  double  spaces",
    "[INST] What is two plus two? [/INST] Two plus two is four.",
    "東京は日本の首都です。 Emoji: 🦙🎉 and accents: àéîõü.",
] * 20


def train_tokenizer(directory: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE model with Llama's settings (byte fallback, digit split, BOS=1, EOS=2)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=1.0, minloglevel=2,
    )
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def random_model(config: ModelArgs, seed: int = 0, std: float = 0.2) -> Llama:
    """A float32 model with random weights large enough to give peaked, non-trivial logits."""
    return init_weights(Llama(config), seed=seed, std=std).eval()


def write_hf_dir(directory: Path, model: Llama, tokenizer: Path | None = None, shards: int = 1,
                 dtype: torch.dtype = torch.float32) -> Path:
    """An HF checkpoint directory: config.json, model.safetensors (or N shards + index), tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_config() | {"torch_dtype": str(dtype).replace("torch.", "")}
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    if shards == 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        names = list(state)
        weight_map = {}
        for index in range(shards):
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: state[name] for name in names[index::shards]}
            save_file(part, directory / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer is not None:
        (directory / tokenizer.name).write_bytes(tokenizer.read_bytes())
    return directory


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread, for real HTTP clients."""

    def __init__(self, app) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServeCommand:
    """`llamaforge serve ARGS` in a child process on a free port, answering /health inside the block."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "llamaforge", "serve", *args, "--port", str(self.port)]
        self.env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})

    def __enter__(self) -> ServeCommand:
        import time
        import urllib.request

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=self.env)
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"llamaforge serve did not start: {self.process.stderr.read()}") from None
                time.sleep(0.2)

    def __exit__(self, *exc_info) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

