"""LoRA: low-rank adapters on a model's linear layers, in HF peft's format so adapters travel both ways.

A wrapped layer is `base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`, with peft's module names
(`q_proj.base_layer`, `q_proj.lora_A`, `q_proj.lora_B`), its initialisation (A Kaiming-uniform, B zero)
and its scaling (alpha / r, or alpha / sqrt(r) with rsLoRA). An adapter directory is peft's:
`adapter_config.json` + `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llamaforge.config import LINEAR_LAYERS
from llamaforge.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = LINEAR_LAYERS  # every linear layer of a decoder layer, as the QLoRA paper found best
# peft adapter_config.json fields whose non-default values change the maths; refused, not ignored.
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
               "modules_to_save": None, "layers_to_transform": None, "layer_replication": None,
               "trainable_token_indices": None, "target_parameters": None, "use_qalora": False,
               "alora_invocation_tokens": None, "exclude_modules": None}


class AdapterError(CheckpointError):
    """An adapter directory that does not fit the model or uses a peft feature llamaforge lacks."""


@dataclass
class LoraConfig:
    """What to adapt and how: peft's LoraConfig fields that llamaforge supports."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> LoraConfig:
        if self.r < 1:
            raise AdapterError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise AdapterError("LoRA needs at least one target module, e.g. q_proj,v_proj")
        return self

    def targets(self, name: str, module: nn.Module) -> bool:
        """Whether the module at `name` gets an adapter (peft's matching rules)."""
        if not isinstance(module, nn.Linear) and not hasattr(module, "in_features"):
            return False
        if self.target_modules == "all-linear":
            return not name.endswith("lm_head")
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == target or name.endswith("." + target) for target in self.target_modules)

    def rank(self, name: str) -> int:
        """Rank of the adapter at `name`, after rank_pattern."""
        return _pattern_value(self.rank_pattern, name, self.r)

    def to_peft(self, base_model: str | None, task_type: str = "CAUSAL_LM",
                saved_modules: list[str] | None = None) -> dict:
        """adapter_config.json as peft writes it (`saved_modules`: whole modules saved beside the adapters, peft's
        modules_to_save, e.g. a reward model's `score` head)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {
            "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "target_modules": targets,
            "use_rslora": self.use_rslora, "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern,
            "init_lora_weights": True, "inference_mode": True, "revision": None, **UNSUPPORTED,
            "modules_to_save": saved_modules or None,
        }

    @classmethod
    def from_peft(cls, data: dict, source: str, saved_modules: tuple[str, ...] = ()) -> LoraConfig:
        """Read peft's adapter_config.json, refusing settings that would change the maths silently
        (`saved_modules`: the modules_to_save the caller loads itself)."""
        if data.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{source} is a {data.get('peft_type')} adapter; llamaforge loads LoRA adapters")
        for key, default in UNSUPPORTED.items():
            value = data.get(key, default)
            if key == "modules_to_save" and value and set(value) <= set(saved_modules):
                continue
            if value not in (default, [], {}) and not (key == "bias" and value is None):
                raise AdapterError(f"{source} sets {key}={value!r}, which llamaforge does not support yet; "
                                   "merge the adapter with peft (merge_and_unload) and load the merged model")
        return cls(r=int(data["r"]), alpha=float(data.get("lora_alpha", 8)), dropout=float(data.get("lora_dropout", 0)),
                   target_modules=data.get("target_modules") or list(DEFAULT_TARGETS),
                   use_rslora=bool(data.get("use_rslora", False)), rank_pattern=data.get("rank_pattern") or {},
                   alpha_pattern=data.get("alpha_pattern") or {}).validate()


def _pattern_value(patterns: dict, name: str, default):
    # peft: the first pattern that matches the end of the module's name wins.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


class LoraLinear(nn.Module):
    """A frozen linear layer (dense or 4-bit) plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device = next(iter([*base_layer.parameters(), *base_layer.buffers()])).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A (out, in), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain linear layer equal to this one without dropout (4-bit bases are dequantized first)."""
        base = self.base_layer
        weight = base.dequantize() if hasattr(base, "dequantize") else base.weight.detach()
        dtype = weight.dtype
        merged = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device, dtype=dtype)
        with torch.no_grad():
            merged.weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(dtype))
        return merged

    def extra_repr(self) -> str:
        return f"r={self.lora_A.out_features}, scaling={self.scaling:g}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) of every LoRA layer, with the base model's module names."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def add_lora(model: nn.Module, config: LoraConfig, ranks: dict[str, int] | None = None) -> nn.Module:
    """Wrap the targeted linear layers in place and freeze everything else; returns the model.

    `ranks` (module name -> rank) names the layers exactly, as a saved adapter does; otherwise the
    config's target_modules and rank_pattern choose them.
    """
    config.validate()
    if ranks is None:
        ranks = {name: config.rank(name) for name, module in model.named_modules()
                 if not isinstance(module, LoraLinear) and config.targets(name, module)}
    if not ranks:
        raise AdapterError(f"no layer of the model matches target_modules={config.target_modules!r}; "
                           f"use names such as {', '.join(DEFAULT_TARGETS)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, r in ranks.items():
        alpha = _pattern_value(config.alpha_pattern, name, config.alpha)
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        model.set_submodule(name, LoraLinear(model.get_submodule(name), r, scaling, config.dropout))
    model.lora_config = config
    return model


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own names (`...q_proj.lora_A.weight`)."""
    return {name: param.detach() for name, param in model.named_parameters() if _is_lora(name)}


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None,
                 weights: dict[str, torch.Tensor] | None = None, task_type: str = "CAUSAL_LM",
                 saved: dict[str, torch.Tensor] | None = None) -> Path:
    """Write peft's adapter directory (config + safetensors) for a model with LoRA layers.

    `weights` (the model's own names) replaces the model's tensors, e.g. gathered from FSDP shards. `saved`: whole
    modules' tensors by their peft name (`score.weight`), written beside the adapters as peft's modules_to_save.
    """
    config: LoraConfig = getattr(model, "lora_config", None)
    if config is None:
        raise AdapterError("this model has no LoRA layers to save; call add_lora first")
    weights = lora_state_dict(model) if weights is None else weights
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saved = saved or {}
    kept = {name: value for name, value in weights.items() if _is_lora(name)} | saved
    tensors = {PEFT_PREFIX + name: value.detach().cpu().contiguous() for name, value in kept.items()}
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    modules = sorted({name.rsplit(".", 1)[0] for name in saved})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config.to_peft(base_model, task_type, modules), indent=2) + "\n")
    return directory


def read_adapter(directory: str | Path,
                 saved_modules: tuple[str, ...] = ()) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter directory's config and tensors, keyed by module name (`...q_proj.lora_A.weight`; `score.weight` for
    the modules_to_save named in `saved_modules`, which the caller loads)."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{directory} has no {ADAPTER_CONFIG}; an adapter directory holds {ADAPTER_CONFIG} "
                           f"and {ADAPTER_WEIGHTS} (what peft's save_pretrained and llamaforge finetune write)")
    try:
        config = LoraConfig.from_peft(json.loads(config_path.read_text()), str(directory), saved_modules)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{config_path} is not a valid peft LoRA config: {exc}") from None
    if (directory / ADAPTER_WEIGHTS).is_file():
        raw = load_file(directory / ADAPTER_WEIGHTS)
    elif (directory / ADAPTER_WEIGHTS_BIN).is_file():
        raw = torch.load(directory / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"{directory} has no {ADAPTER_WEIGHTS}")
    tensors = {}
    for key, value in raw.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")  # older peft kept the adapter name
        tensors[name] = value
    return config, tensors


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Put a peft LoRA adapter on the model (in place), checking every tensor against the layers it targets."""
    config, tensors = read_adapter(directory)
    return apply_adapter(model, config, tensors, directory)


def apply_adapter(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor],
                  directory: str | Path) -> nn.Module:
    """Put the adapter `read_adapter` read from `directory` on the model (in place), checking every tensor."""
    modules = dict(model.named_modules())
    unknown = sorted({name.rsplit(".lora_", 1)[0] for name in tensors} - set(modules))
    if unknown:
        raise AdapterError(f"the adapter in {directory} adapts layers this model lacks, e.g. {unknown[:3]}; "
                           "it was trained for another architecture")
    # The file says exactly which layers are adapted and at what rank.
    ranks = {name.removesuffix(".lora_A.weight"): tensor.shape[0] for name, tensor in tensors.items()
             if name.endswith(".lora_A.weight")}
    add_lora(model, config, ranks)
    for name, layer in lora_layers(model):
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            if key not in tensors:
                raise AdapterError(f"the adapter in {directory} lacks {key}")
            target = getattr(layer, part).weight
            if tuple(tensors[key].shape) != tuple(target.shape):
                raise AdapterError(f"adapter tensor {key} has shape {tuple(tensors[key].shape)} but the model "
                                   f"needs {tuple(target.shape)}; the adapter was trained on another model size")
            with torch.no_grad():
                target.copy_(tensors[key])
    model.lora_config = config
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the LoRA layers (in place)."""
    for name, layer in list(lora_layers(model)):
        model.set_submodule(name, layer.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
