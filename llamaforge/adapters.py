"""Many LoRA adapters served from one base model, each row of a batch with its own (or none).

`AdapterStack(model, max_adapters, max_rank)` wraps every projection of the decoder layers in a `MultiLoraLinear`,
which keeps all adapters' A and B matrices stacked by slot (slot 0: none, all zeros). Before a forward the engine
says which slot each row uses (`AdapterStack.selection`); each layer adds every row's low-rank update with two
matrix products over all slots at once (each row masked to its own slot's ranks between them), so requests for
different adapters and the base share one step at the same few operator calls however many adapters it holds.
With no adapter row in a batch the layers are the base model's. In a bfloat16 CPU model the updates are
decode_layers.c's (`kernels.bf16_lora`), which the fused decode layers also add, so decode steps with adapter rows
stay on the fused path.

Adapters are peft directories (what `llamaforge finetune` and peft's save_pretrained write); their scaling is folded
into B when loaded, ranks below `max_rank` are padded with zeros (which add nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from llamaforge.lora import AdapterError, _pattern_value, read_adapter
from llamaforge.model import Llama, project
from llamaforge.quantize import kernels

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


class AdapterSelection:
    """Which adapter slot each row of the next forward uses; `rows` None: the base model for every row."""

    def __init__(self, slots: int, rank: int) -> None:
        self.slots, self.rank = slots, rank
        self.rows: list[int] | None = None
        self.slot_ids: torch.Tensor | None = None  # (B,) int64 on the CPU: what the C kernels read
        self.device: torch.device | str = "cpu"
        self._mask: torch.Tensor | None = None

    def select(self, rows: list[int] | None, device: torch.device | str) -> None:
        """Set the rows' slots for the next forward (None or all 0: the base model everywhere)."""
        self._mask = None
        if rows is None or not any(rows):
            self.rows, self.slot_ids = None, None
            return
        self.rows, self.device = rows, device
        self.slot_ids = torch.tensor(rows, dtype=torch.int64)

    @property
    def mask(self) -> torch.Tensor:
        """(B, slots * rank): 1 on each row's own slot's block of ranks, for the torch path; built on first use, as
        bfloat16 CPU models (the C kernels read `slot_ids`) never need it. Only while rows are selected."""
        if self._mask is None:
            mask = torch.zeros(len(self.rows), self.slots, self.rank, device=self.device)
            mask[torch.arange(len(self.rows)), self.slot_ids.to(self.device)] = 1.0
            self._mask = mask.flatten(1)
        return self._mask


class MultiLoraLinear(nn.Module):
    """A base linear layer plus the low-rank updates of several adapters, one per slot, chosen per row."""

    serves_adapters = True  # read by the fused decode path, which multiplies base_layer where no row is adapted

    def __init__(self, base_layer: nn.Module, slots: int, rank: int, selection: AdapterSelection) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device = next(iter([*base_layer.parameters(), *base_layer.buffers()])).device
        # float32, as an unmerged LoraLinear computes; scaling folded into B. Laid out so that all slots' matrices
        # are one (slots * rank, in) and one (slots * rank, out) matrix: every row's update is two products for the
        # whole batch, whatever the adapters in it, with each row masked to its own slot's ranks in between. The C
        # kernels (bfloat16 CPU models) read row by row each slot's (rank, in) and (rank, out) block instead.
        self.register_buffer("lora_A", torch.zeros(slots, rank, self.in_features, device=device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots, rank, self.out_features, device=device), persistent=False)
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_updates(x, self.base_layer(x))

    @staticmethod
    def forward_many(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
        """model.project's protocol: the base layers together (one kernel call where they allow), then each update."""
        outs = project(x, *(layer.base_layer for layer in layers))
        return [layer.add_updates(x, out) for layer, out in zip(layers, outs, strict=True)]

    def add_updates(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus each row's adapter update of x: x (B, ..., in), y (B, ..., out)."""
        if self.selection.rows is None:
            return y
        B = len(self.selection.rows)
        # A bfloat16 CPU model: decode_layers.c's updates, rounded as the fused decode layers round them.
        if kernels.bf16_inference(x, y) and self.lora_A.dtype == torch.float32 and kernels.decode_available():
            out = kernels.eager_or_op(kernels.bf16_lora, kernels.bf16_lora_op, x.reshape(B, -1, self.in_features),
                                      y.reshape(B, -1, self.out_features), self.lora_A, self.lora_B,
                                      self.selection.slot_ids)
            return out.reshape(y.shape)
        inputs = x.reshape(B, -1, self.in_features).float()  # (B, T, in)
        mask = self.selection.mask  # (B, slots * rank)
        low = inputs @ self.lora_A.flatten(0, 1).T * mask[:, None]  # (B, T, slots * rank), other slots' zeroed
        update = low @ self.lora_B.flatten(0, 1)  # (B, T, out)
        return y + update.reshape(y.shape).to(y.dtype)


class AdapterStack:
    """The adapters a model serves, by name; loading and unloading must happen between forwards."""

    def __init__(self, model: Llama, max_adapters: int = 8, max_rank: int = 64) -> None:
        if max_adapters < 1 or max_rank < 1:
            raise AdapterError(f"max_adapters and max_rank must be >= 1, got {max_adapters} and {max_rank}")
        self.model, self.max_rank = model, max_rank
        self.selection = AdapterSelection(max_adapters + 1, max_rank)
        self.slots: dict[str, int] = {}  # name -> slot (1 .. max_adapters)
        self.paths: dict[str, str] = {}
        self.free = list(range(1, max_adapters + 1))
        self.layers: dict[str, MultiLoraLinear] = {}
        for index in range(len(model.model.layers)):
            for projection in PROJECTIONS:
                name = f"model.layers.{index}.{projection}"
                wrapped = MultiLoraLinear(model.get_submodule(name), max_adapters + 1, max_rank, self.selection)
                model.set_submodule(name, wrapped)
                self.layers[name] = wrapped
        model.adapter_selection = self.selection

    def add(self, name: str, path: str | Path) -> int:
        """Load the peft adapter at `path` as `name`; its slot. AdapterError (naming the problem) if it does not fit
        this model or no slot is free."""
        if not name or name in self.slots:
            raise AdapterError(f"an adapter named {name!r} is already loaded" if name else "an adapter needs a name")
        if not self.free:
            raise AdapterError(f"all {len(self.slots)} adapter slots are in use; unload one first")
        config, tensors = read_adapter(path)
        updates = {}
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            b = tensors.get(f"{module}.lora_B.weight")
            layer = self.layers.get(module)
            if layer is None or b is None:
                raise AdapterError(f"the adapter in {path} adapts {module}, which this server cannot serve (it serves "
                                   f"the decoder layers' {', '.join(p.split('.')[-1] for p in PROJECTIONS)})")
            rank = a.shape[0]
            if tuple(a.shape) != (rank, layer.in_features) or tuple(b.shape) != (layer.out_features, rank):
                raise AdapterError(f"adapter tensor {module} has shapes {tuple(a.shape)} and {tuple(b.shape)} but "
                                   f"this model's layer is {layer.out_features} x {layer.in_features}; the adapter "
                                   "was trained on another model size")
            if rank > self.max_rank:
                raise AdapterError(f"the adapter in {path} has rank {rank} at {module}; this server takes rank "
                                   f"{self.max_rank} at most (raise --max-lora-rank)")
            alpha = _pattern_value(config.alpha_pattern, module, config.alpha)
            scaling = alpha / (rank ** 0.5 if config.use_rslora else rank)
            updates[module] = (a.float(), b.float() * scaling)
        if not updates:
            raise AdapterError(f"the adapter in {path} holds no LoRA matrices")
        slot = self.free.pop(0)
        for module, layer in self.layers.items():
            a, b = updates.get(module, (None, None))
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            if a is not None:
                layer.lora_A[slot, :a.shape[0]] = a.to(layer.lora_A.device)
                layer.lora_B[slot, :b.shape[1]] = b.T.to(layer.lora_B.device)
        self.slots[name], self.paths[name] = slot, str(path)
        return slot

    def remove(self, name: str) -> None:
        """Unload the adapter `name` (its slot's matrices are zeroed and the slot reused)."""
        slot = self.slots.pop(name, None)
        if slot is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        del self.paths[name]
        for layer in self.layers.values():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
        self.free.append(slot)
        self.free.sort()
