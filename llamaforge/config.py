"""Model hyper-parameters (`ModelArgs`), the Llama 2 presets, and readers for HF and Meta config files."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaforge.errors import CheckpointError

ROPE_SCALING_TYPES = ("linear", "dynamic")
DEMO = "demo"  # the built-in model's name (llamaforge/data/demo); a local directory called demo is ./demo
# A decoder layer's linear layers, by their HF names: what LoRA adapts unless told otherwise.
LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROPE_SCALING_EXAMPLE = '{"type": "linear", "factor": 2.0}'
# ModelArgs field -> the config.json key it is read from, so errors speak the file's own words.
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
           "max_seq_len": "max_position_embeddings"}
SIZES = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len")


class FieldError(CheckpointError):
    """A config value out of range; a reader rewords it in its file's own key names (`describe`)."""

    def __init__(self, field: str, value: Any, rule: str, related: str | None = None) -> None:
        self.field, self.value, self.rule, self.related = field, value, rule, related
        super().__init__(self.describe({}))

    def describe(self, keys: Mapping[str, str]) -> str:
        """The problem with fields named as `keys` maps them (ModelArgs' own names where it does not)."""
        rule = self.rule.format(keys.get(self.related, self.related)) if self.related else self.rule
        return f"{keys.get(self.field, self.field)}={self.value!r} but it must be {rule}"


@contextmanager
def reading(source: str | Path, keys: Mapping[str, str] | None = None) -> Iterator[None]:
    """Name the config file, and its own key for a bad value (`keys`: ModelArgs field -> key), in its errors."""
    try:
        yield
    except FieldError as exc:
        raise CheckpointError(f"{source} says {exc.describe(keys or {})}; correct the file or download it "
                              "again") from None
    except KeyError as missing:
        raise CheckpointError(f"{source} lacks the key {missing}; is this a Llama checkpoint?") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_positive_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


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
        self._check()
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)

    def _check(self) -> None:
        """Refuse a shape no network has, before anything is sized from it (a 0 would reach torch as a warning)."""
        for name in SIZES:
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise FieldError(name, getattr(self, name), "a positive integer")
        if self.dim % (2 * self.n_heads):
            raise FieldError("dim", self.dim, f"an even multiple of {{}} ({self.n_heads}): RoPE rotates pairs of "
                             "each head's dimensions", related="n_heads")
        if self.n_heads % self.n_kv_heads:
            raise FieldError("n_kv_heads", self.n_kv_heads, f"a divisor of {{}} ({self.n_heads})", related="n_heads")
        for name in ("norm_eps", "rope_theta"):
            if not _is_positive_number(getattr(self, name)):
                raise FieldError(name, getattr(self, name), "a positive number")
        if not isinstance(self.tie_word_embeddings, bool):
            raise FieldError("tie_word_embeddings", self.tie_word_embeddings, "true or false")
        for name in ("bos_token_id", "eos_token_id"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise FieldError(name, getattr(self, name), "a non-negative integer")

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
    if not isinstance(scaling, dict):
        raise FieldError("rope_scaling", scaling, f"an object like {ROPE_SCALING_EXAMPLE}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise CheckpointError(
            f"rope_scaling type {kind!r} is not supported; Llama 2 uses one of {ROPE_SCALING_TYPES}"
        )
    factor = scaling.get("factor", 0)
    if not _is_positive_number(factor) or factor < 1.0:
        raise CheckpointError(f"rope_scaling factor must be a number >= 1.0, got {factor!r}")
    return {"type": kind, "factor": float(factor)}


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


def from_hf_config(config: dict[str, Any], source: str | Path = "config.json") -> ModelArgs:
    """Read a `transformers` `config.json` dict (both the 4.x `rope_scaling` and 5.x `rope_parameters`)."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{source} has model_type {model_type!r}; llamaforge loads Llama models only")
    with reading(source, HF_KEYS):
        rope = config.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise FieldError("rope_parameters", rope, f"an object like {ROPE_SCALING_EXAMPLE}")
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
            eos_token_id=(eos[0] if isinstance(eos, list) and eos else eos) or 2,
            extra={k: v for k, v in config.items() if k in ("torch_dtype", "dtype")},
        )


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU inner size exactly as Meta's `FeedForward` derives it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def from_meta_params(params: dict[str, Any], vocab_size: int, source: str | Path = "params.json") -> ModelArgs:
    """Read Meta's `params.json`; its vocab_size is -1, so the caller passes the embedding rows."""
    with reading(source):
        dim, multiple_of = params["dim"], params.get("multiple_of", 256)
        multiplier = params.get("ffn_dim_multiplier")
        # The SwiGLU size is computed from these, so they are checked before ModelArgs sees the result.
        for name, value in (("dim", dim), ("multiple_of", multiple_of)):
            if not _is_int(value) or value <= 0:
                raise FieldError(name, value, "a positive integer")
        if multiplier is not None and not _is_positive_number(multiplier):
            raise FieldError("ffn_dim_multiplier", multiplier, "a positive number or null")
        return ModelArgs(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab_size,
            hidden_dim=meta_hidden_dim(dim, multiple_of, multiplier),
            norm_eps=params.get("norm_eps", 1e-5),
            max_seq_len=params.get("max_seq_len", 4096),
            rope_theta=params.get("rope_theta", 10000.0),
        )


JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file (a config, an index) with an error that names the file."""
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # bad JSON, bytes that are no text, nesting past the parser's depth
        raise CheckpointError(f"{path} is not valid JSON ({type(exc).__name__}: {exc}); re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {JSON_KINDS[type(data)]} where a JSON object belongs; "
                              "re-download it")
    return data
