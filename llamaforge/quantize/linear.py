"""`QuantizedLinear`, an int8 / int4 linear layer, and `quantize_model`, which puts them into a Llama in place.

On CPUs with AVX-512 VNNI or AVX2 every input goes through the compiled kernel: decoding reads each weight byte once
at memory speed, and a prompt's many rows run at integer dot-product speed, faster here than dequantizing the weight
for torch's bfloat16 GEMM at every row count measured (docs/benchmarks.md). Elsewhere the weight is dequantized
to the activations' dtype, one layer at a time, and multiplied by torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from llamaforge.quantize import kernels
from llamaforge.quantize.formats import GROUP_SIZES, QuantizedWeight, check_scheme, stored_codes
from llamaforge.quantize.nf4 import NF4Linear

# Up to this many tokens per sequence the bfloat16 kernel runs (decoding, short prompts); above, torch's GEMM is
# faster on CPUs with AVX-512 BF16 (docs/benchmarks.md). The choice looks at each sequence's own token count, not at
# the batch, so a sequence's numbers never depend on what it is batched with. On AVX2 CPUs the kernel's AVX2 build
# takes every call: torch's bfloat16 GEMM there widens each value in a slow loop (the kernel is 3-4x faster at 17-512
# rows).
KERNEL_MAX_TOKENS = 16
MODES = {"int8": 8, "int4": 4}


class QuantizedLinear(nn.Module):
    """A frozen, bias-free linear layer whose weight is stored as int8 or int4 codes with float16 scales."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bits, self.group_size, self.kind = weight.bits, weight.group_size, weight.kind
        # Buffers: `.to(device)` moves them, `state_dict` saves them, optimizers skip them.
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None) -> QuantizedLinear:
        """Quantize a bias-free `nn.Linear`'s weight."""
        if linear.bias is not None:
            raise ValueError(f"QuantizedLinear has no bias; cannot quantize {linear} (Llama's linears have none)")
        return cls(kernels.quantize(linear.weight, bits, group_size))

    @property
    def weight_q(self) -> QuantizedWeight:
        """The quantized weight, viewing this module's buffers."""
        return QuantizedWeight(self.codes, self.scales, self.bits, self.group_size, self.in_features,
                               self.out_features, self.kind)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out_features, in_features) weight."""
        return kernels.dequantize(self.weight_q, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K); each row's result depends on that row alone
        if not kernels.kernel_runs(rows):
            return kernels.fallback_linear(rows, self.weight_q).view(*x.shape[:-1], self.out_features)
        return self._kernel(rows, [self])[0].view(*x.shape[:-1], self.out_features)

    @staticmethod
    def forward_many(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
        """Each of `layers` applied to x (model.project's protocol): in one kernel call, which quantizes x once and
        shares out all their rows, where they are QuantizedLinear layers of one scheme; else one by one."""
        rows = x.reshape(-1, x.shape[-1])
        together = (kernels.kernel_runs(rows) and len(layers) <= kernels.MAX_MANY
                    and all(type(layer) is QuantizedLinear for layer in layers)
                    and len({(layer.bits, layer.group_size, layer.kind, layer.in_features) for layer in layers}) == 1)
        if not together:
            return [layer(x) for layer in layers]
        outs = QuantizedLinear._kernel(rows, layers)
        return [out.view(*x.shape[:-1], layer.out_features) for out, layer in zip(outs, layers, strict=True)]

    @staticmethod
    def _kernel(rows: torch.Tensor, layers: Sequence[QuantizedLinear]) -> list[torch.Tensor]:
        first = layers[0]
        if torch.compiler.is_compiling():
            return kernels.qlinear_many_op(rows, [layer.codes for layer in layers], [layer.scales for layer in layers],
                                           first.bits, first.group_size, first.kind, first.in_features,
                                           [layer.out_features for layer in layers])
        # Eager: the ctypes call directly (the operator's dispatch costs ~10 us a call).
        return kernels.qlinear_many(rows, [layer.weight_q for layer in layers])

    # state_dict() holds the stored layout (formats.stored_codes), which does not depend on the kernel's tiling;
    # the module keeps the kernel's.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[f"{prefix}codes"], destination[f"{prefix}scales"] = stored_codes(self.weight_q)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        codes, scales = state_dict.get(f"{prefix}codes"), state_dict.get(f"{prefix}scales")
        if codes is not None and scales is not None:
            q = kernels.repack_stored(codes, scales, self.bits, self.group_size, self.in_features, self.kind)
            state_dict[f"{prefix}codes"], state_dict[f"{prefix}scales"] = q.codes, q.scales
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedLinear:
        # `Module.to(dtype)` would cast the float16 scales along with the model; keep them (device moves only).
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}" + (f", kind={self.kind}" if self.kind != "int" else ""))


class Bf16Linear(nn.Linear):
    """nn.Linear whose bfloat16 CPU decode steps run the bfloat16 kernel (same weight, same state dict)."""

    # Sequences of more tokens a call take torch's GEMM; None: every call takes the kernel (batch-invariant models).
    kernel_max_tokens: int | None = KERNEL_MAX_TOKENS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[-2] if x.dim() > 2 else 1
        limit = self.kernel_max_tokens
        if ((limit is not None and tokens > limit) or self.bias is not None
                or not kernels.bf16_inference(x, self.weight) or not kernels.bf16_available()):
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        return kernels.eager_or_op(kernels.bf16_linear, kernels.bf16_linear_op, rows,
                                   self.weight).view(*x.shape[:-1], self.out_features)


def use_bf16_kernel(model: nn.Module, batch_invariant: bool = False) -> int:
    """Make every bias-free bfloat16 CPU nn.Linear of `model` a Bf16Linear in place (sharing its weight), and, in a
    bfloat16 CPU model, its attention over the KV cache, its norms and its SwiGLU the compiled kernels (per module:
    any module with one of KERNEL_HOOKS); how many linears changed (none in a float32 or GPU model).

    `batch_invariant`: the linears take the kernel for prompts too (torch's GEMM is 1.5-1.8x faster there with AVX-512
    BF16, but may round a row differently with the rows beside it), so a sequence's numbers do not depend on how its
    prompt is chunked, cached or batched; `check_batch_invariant` says whether the whole model then is. (On AVX2
    CPUs the linears take the kernel for prompts anyway: it is the faster there.)"""
    changed = 0
    prompts_too = batch_invariant or kernels.instruction_set(kernels.BF16_CPU_FLAGS) == "avx2"
    for module in model.modules():
        if (type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.bfloat16
                and module.weight.device.type == "cpu"):
            module.__class__ = Bf16Linear  # a subclass adding only forward: no state to move or copy
            changed += 1
        if prompts_too and isinstance(module, Bf16Linear):
            module.kernel_max_tokens = None
    dtype, device = getattr(model, "dtype", None), getattr(model, "device", None)
    if dtype == torch.bfloat16 and device is not None and device.type == "cpu":
        for module in model.modules():
            for name, kernel in KERNEL_HOOKS.items():
                if hasattr(type(module), name):
                    setattr(module, name, functools.partial(kernel, fallback=getattr(type(module), name)))
    return changed


def check_batch_invariant(model: nn.Module) -> None:
    """ValueError naming the fix unless every row of `model` is computed alike however it is batched, chunked or
    cached: a bfloat16 CPU model (the attention, norm and SwiGLU kernels) whose linears all run the kernels at any
    row count (Bf16Linear made batch-invariant by `use_bf16_kernel`, or int8 / int4 QuantizedLinear)."""
    dtype, device = getattr(model, "dtype", None), getattr(model, "device", None)
    if dtype != torch.bfloat16 or device is None or device.type != "cpu" or not kernels.bf16_available():
        raise ValueError("batch-invariant inference runs the bfloat16 CPU kernels (AVX-512 BF16 or AVX2); this model "
                         f"is "
                         f"{dtype} on {device}{'' if kernels.bf16_available() else ' and this CPU lacks them'}: "
                         "load it with dtype bfloat16 on the CPU, or drop batch_invariant")
    for name, module in model.named_modules():
        invariant = (isinstance(module, Bf16Linear) and module.kernel_max_tokens is None) or (
            isinstance(module, QuantizedLinear) and kernels.available())
        if isinstance(module, (nn.Linear, QuantizedLinear, NF4Linear)) and not invariant:
            raise ValueError(f"batch-invariant inference needs every linear layer on the bfloat16 or int8 / int4 "
                             f"kernels; {name} is a {type(module).__name__}: drop batch_invariant (or nf4)")


# model.py's per-module hooks and the CPU kernels that replace them in bfloat16 models (each falls back to the
# hook's torch version for tensors it does not take). The norm and SwiGLU kernels are the ones the fused decode
# layers run, so a sequence's numbers do not depend on which of the two paths a step takes.
KERNEL_HOOKS = {"attend_cache": kernels.attend_cache, "normalize": kernels.rms_norm,
                "activation": kernels.swiglu}


def parse_mode(mode: str, group_size: int | None = None) -> int:
    """The bit width of "int8" / "int4", after checking the group size suits it; ValueError naming the fix."""
    if mode not in MODES:
        raise ValueError(f"quantize mode {mode!r} is not one of {', '.join(MODES)}")
    check_scheme(MODES[mode], group_size)
    return MODES[mode]


def quantize_model(model: nn.Module, mode: str, group_size: int | None = None) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` by a QuantizedLinear ("int8" or "int4").

    int8 uses one scale per output row unless `group_size` is given; int4 groups of `group_size` (default 32,
    llama.cpp's Q4_0). In int4 the output projection `lm_head` is stored in int8, as llama.cpp keeps its
    output tensor at 6 bits or more: it decides every token, and is a small part of a 7B model's bytes. So is
    a layer whose width the group size does not divide (none in Llama 2's shapes; stories260K's 172-wide down
    projections), where llama.cpp's quantizer falls back to a wider type too.
    """
    bits = parse_mode(mode, group_size)
    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in targets:
        linear = model.get_submodule(name)
        # One layer at a time: each dense weight is freed once its codes exist, so the peak stays one layer.
        model.set_submodule(name, QuantizedLinear.from_linear(linear, *layer_scheme(name, linear.in_features, bits,
                                                                                    group_size)))
    return model


def layer_scheme(name: str, in_features: int, bits: int, group_size: int | None) -> tuple[int, int | None]:
    """The bits and group size `quantize_model` gives the linear `name` (see there): int8 for int4's output layer
    and for widths the group does not divide, one scale a row for int8 where its group does not divide the width."""
    head = name == "lm_head" or name.endswith(".lm_head")
    if bits == 4 and (head or in_features % (group_size or GROUP_SIZES[0]) != 0):  # int4's default group
        return 8, None
    ragged = group_size is not None and in_features % group_size != 0
    return bits, None if bits == 8 and ragged else group_size


def weight_quantizer(mode: str, group_size: int | None = None) -> Callable[[str, torch.Tensor], QuantizedWeight]:
    """A function quantizing the weight of linear `name` (its state key, "....weight") as `quantize_model` would:
    for checkpoint.build_model, which then quantizes each linear weight as it is read, so a load never holds the
    whole float model (a 7B bfloat16 checkpoint loaded as int4 peaked at 7.0 GiB of anonymous memory, 3.7 now)."""
    bits = parse_mode(mode, group_size)

    def quantize(name: str, weight: torch.Tensor) -> QuantizedWeight:
        return kernels.quantize(weight, *layer_scheme(name.removesuffix(".weight"), weight.shape[1], bits,
                                                      group_size))

    return quantize


def linear_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's weight, quantized or dense (what one decode step reads)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.codes.nbytes + module.scales.nbytes
        elif isinstance(module, nn.Linear):
            total += module.weight.nbytes
    return total


class DenseState(Mapping[str, torch.Tensor]):
    """`model.state_dict()` with each quantized layer's codes and scales replaced by its weight, dequantized to
    float32 each time it is read and never kept: exporting a quantized 7B model holds one dense layer at a time
    (its whole float32 copy would be 27 GB)."""

    def __init__(self, model: nn.Module) -> None:
        self._state = model.state_dict()
        layers = {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
        self._layers = {f"{name}.weight": module for name, module in layers.items()}
        self._keys = []  # the state's order, each layer's codes standing for its weight
        for key in list(self._state):
            layer, _, part = key.rpartition(".")
            if layer not in layers:
                self._keys.append(key)
                continue
            if part == "codes":
                self._keys.append(f"{layer}.weight")
            del self._state[key]  # codes and scales: read through the layer

    def __getitem__(self, key: str) -> torch.Tensor:
        layer = self._layers.get(key)
        return self._state[key] if layer is None else layer.dequantize(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def dense_state_dict(model: nn.Module) -> DenseState:
    """`model.state_dict()` with each quantized layer's weight dequantized as it is read (see DenseState)."""
    return DenseState(model)
