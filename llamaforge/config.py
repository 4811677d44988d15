"""Model hyper-parameters (`ModelArgs`), the Llama 2 presets, and readers for HF and Meta config files."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaforge.errors import CheckpointError

ROPE_SCALING_TYPES = ("linear", "dynamic")


@dataclass
class ModelArgs:
    """The shape of a Llama 2 network; field meanings follow Meta's `ModelArgs`, values HF's config."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (7B, 13B); 70B uses 8 (grouped-query attention)
    vocab_size: int = 32000
    hidden_dim: int = 11008  # SwiGLU inner size (HF `intermediate_size`)
    norm_eps: float = 1e-5
    max_seq_len: int = 4096  # the trained context (HF `max_position_embeddings`)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear" | "dynamic", "factor": float}
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # HF config keys kept for round trips

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise CheckpointError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def context_length(self) -> int:
        """Longest prompt + generation the model serves: the trained context stretched by RoPE scaling."""
        if self.rope_scaling is None:
            return self.max_seq_len
        return int(self.max_seq_len * self.rope_scaling["factor"])

    def num_parameters(self) -> int:
        """Parameter count computed from the shape alone."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = 2 * self.dim * self.dim + 2 * self.dim * kv_dim
        mlp = 3 * self.dim * self.hidden_dim
        layer = attention + mlp + 2 * self.dim
        embeddings = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * layer + embeddings + self.dim

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dict that `transformers.LlamaConfig` reads."""
        config = {
            **self.extra,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.hidden_dim,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
        }
        config.pop("rope_parameters", None)
        return config

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)


def _normalise_rope_scaling(scaling: dict[str, Any]) -> dict[str, Any] | None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise CheckpointError(
            f"rope_scaling type {kind!r} is not supported; Llama 2 uses one of {ROPE_SCALING_TYPES}"
        )
    factor = float(scaling.get("factor", 0))
    if factor < 1.0:
        raise CheckpointError(f"rope_scaling factor must be >= 1.0, got {scaling.get('factor')!r}")
    return {"type": kind, "factor": factor}


PRESETS: dict[str, ModelArgs] = {
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    # Shapes for tests and benchmarks; weights come from a random initialisation.
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, hidden_dim=172, max_seq_len=256),
    "tiny-gqa": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, hidden_dim=172,
                          max_seq_len=256),
    "tinyllama-1.1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                                max_seq_len=2048),
}


def from_hf_config(config: dict[str, Any]) -> ModelArgs:
    """Read a `transformers` `config.json` dict (both the 4.x `rope_scaling` and 5.x `rope_parameters`)."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"config.json has model_type {model_type!r}; llamaforge loads Llama models only")
    try:
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        eos = config.get("eos_token_id", 2)
        return ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"),
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            max_seq_len=config.get("max_position_embeddings", 4096),
            rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=config.get("bos_token_id", 1) or 1,
            eos_token_id=(eos[0] if isinstance(eos, list) else eos) or 2,
            extra={k: v for k, v in config.items() if k in ("torch_dtype", "dtype")},
        )
    except KeyError as missing:
        raise CheckpointError(f"config.json lacks the key {missing}; is this a Llama checkpoint?") from None


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU inner size exactly as Meta's `FeedForward` derives it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def from_meta_params(params: dict[str, Any], vocab_size: int) -> ModelArgs:
    """Read Meta's `params.json`; its vocab_size is -1, so the caller passes the embedding rows."""
    try:
        return ModelArgs(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab_size,
            hidden_dim=meta_hidden_dim(params["dim"], params.get("multiple_of", 256),
                                       params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-5),
            max_seq_len=params.get("max_seq_len", 4096),
            rope_theta=params.get("rope_theta", 10000.0),
        )
    except KeyError as missing:
        raise CheckpointError(f"params.json lacks the key {missing}; is this a Meta Llama download?") from None


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON config file with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download it") from None
