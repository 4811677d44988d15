"""HF checkpoint directories: config.json with safetensors (single or sharded) or pytorch_model*.bin."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from llamaforge.checkpoint.inventory import Inventory
from llamaforge.config import HF_KEYS, ModelArgs, from_hf_config, read_json
from llamaforge.errors import CheckpointError
from llamaforge.tokenizer import Tokenizer

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(path: Path) -> ModelArgs:
    return from_hf_config(read_json(path / "config.json"), path / "config.json")


def stored_dtype(path: Path) -> torch.dtype | None:
    """The float dtype config.json says the weights are stored in, if it says one."""
    config = read_json(path / "config.json")
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if dtype in FLOAT_DTYPES else None


def read_inventory(path: Path) -> Inventory:
    """Every tensor's name and shape, from the safetensors headers or the pickles, without reading the data."""
    files = weight_files(path)
    inventory = Inventory(path / "config.json", files, HF_KEYS)
    for file in files:
        for name, shape in tensor_shapes(file).items():
            inventory.add(name, shape, file)
    return inventory


def tensor_shapes(file: Path) -> dict[str, Sequence[int]]:
    """The shapes of one weight file's tensors: a safetensors header's list (which safetensors has checked
    against the file's size), or a torch.save'd file's pickle, memory-mapped so no tensor data is read."""
    if file.suffix != ".safetensors":
        return {name: tensor.shape for name, tensor in load_torch_file(file).items()}
    from safetensors import safe_open

    with damaged_safetensors(file), safe_open(str(file), framework="pt") as handle:
        return {name: handle.get_slice(name).get_shape() for name in handle.keys()}  # noqa: SIM118


def weight_files(path: Path) -> list[Path]:
    """The weight files of an HF directory, safetensors preferred, in shard order."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(shard_names(index)))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} lists shards that are not in {path}: {', '.join(missing)}; finish the download"
                )
            return [path / s for s in shards]
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not found:
        raise CheckpointError(
            f"{path} has a config.json but no weights (model.safetensors, model-0000N-of-0000M.safetensors "
            "or pytorch_model.bin); download the weight files into it"
        )
    return found


def shard_names(index: Path) -> list[str]:
    """The shard file names an index's weight_map lists; each must be a plain name in the index's folder."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and name and Path(name).name == name for name in weight_map.values()):
        raise CheckpointError(f"{index} has no weight_map from tensor names to shard files beside it; re-download it")
    return list(weight_map.values())


def iter_tensors(path: Path, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in HF naming, one at a time, memory-mapped where the format allows."""
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            yield from iter_safetensors(file, dtype, device)
        else:
            yield from load_torch_file(file).items()


def iter_safetensors(file: Path, dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one safetensors file, converted to dtype/device where they differ, read lazily.

    `safe_open` maps the whole file, and a page read through the mapping stays resident until the handle
    closes. Tensors kept as they are (same dtype, on the CPU) stay views of one shared mapping; a tensor
    to cast or move is read through a handle of its own, closed right after, so loading never holds the
    checkpoint in memory beside the converted model (measured in benchmarks/load_memory.py).
    """
    from safetensors import safe_open

    def converts(tensor: torch.Tensor) -> bool:
        return (dtype is not None and tensor.dtype != dtype) or (device is not None and device.type != "cpu")

    with damaged_safetensors(file), safe_open(str(file), framework="pt") as shared:
        for name in shared.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = shared.get_tensor(name)  # a view of the mapping: nothing is read yet
            if converts(tensor):
                with safe_open(str(file), framework="pt") as own:
                    tensor = own.get_tensor(name).to(device=device, dtype=dtype)
            yield name, tensor


@contextmanager
def damaged_safetensors(file: Path) -> Iterator[None]:
    """Turn what safetensors raises for a damaged file into one error that names it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is truncated or corrupt ({exc}); delete it and download it again") from None


def load_torch_file(file: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, memory-mapped, tensors only (no pickled code runs)."""
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch.load raises many types for damaged files
        raise CheckpointError(f"{file} could not be read as a PyTorch checkpoint ({exc}); re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(name, str) and isinstance(tensor, torch.Tensor)
                                              for name, tensor in state.items()):
        raise CheckpointError(f"{file} does not hold a state dict (tensor names to tensors); it is not a model "
                              "checkpoint")
    return state


QUANTIZED_PARTS = (".codes", ".scales")  # an int8 / int4 layer's tensors (checkpoint/quantized.py)


def save_hf_dir(state: dict[str, torch.Tensor], config: ModelArgs, directory: str | Path,
                tokenizer: Tokenizer | None = None, dtype: torch.dtype | None = None,
                max_shard_bytes: int = 5 * 2**30, chat_template: str | None = None,
                quantization: dict | None = None, extra_config: dict | None = None) -> Path:
    """Write an HF checkpoint (config.json, safetensors shards + index, tokenizer) atomically.

    With a tokenizer, tokenizer_config.json says how transformers should load it, and `chat_template` (a
    Jinja template, as chat.JINJA_TEMPLATE) lets its `apply_chat_template` format dialogs as llamaforge does.

    `quantization` (quantized.quantization_config) goes into config.json for a state holding int8 / int4 layers,
    whose codes and scales `dtype` leaves as they are; `extra_config` is merged into config.json last (a reward
    model's architecture and label count).

    Files go to a sibling temporary folder that is renamed into place at the end, so a crash never
    leaves a directory that looks complete but is not.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory} already exists and is not empty; choose a new --out directory")
    staging = directory.with_name(f".{directory.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    def stored(name: str, tensor: torch.Tensor) -> torch.Tensor:
        keep = dtype is None or name.endswith(QUANTIZED_PARTS)  # codes and their float16 scales stay as they are
        return tensor.detach().to("cpu", tensor.dtype if keep else dtype).contiguous()

    tensors = {name: stored(name, t) for name, t in state.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], staging / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for index, shard in enumerate(shards, start=1):
            file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, staging / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, file)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))
    floats = next(t.dtype for name, t in tensors.items() if not name.endswith(QUANTIZED_PARTS))
    hf_config = config.to_hf_config() | {"torch_dtype": str(floats).removeprefix("torch.")}
    if quantization is not None:
        hf_config["quantization_config"] = quantization
    hf_config |= extra_config or {}
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        saved = tokenizer.save(staging)
        tokenizer_config = {
            "tokenizer_class": "LlamaTokenizer" if saved.name == "tokenizer.model" else "PreTrainedTokenizerFast",
            "bos_token": tokenizer.id_to_piece(tokenizer.bos_id), "eos_token": tokenizer.id_to_piece(tokenizer.eos_id),
            "add_bos_token": True, "add_eos_token": False, "model_max_length": config.context_length,
            # Meta's encoding: text right after <s> still gets SentencePiece's word-start "▁" ([INST] is "▁[").
            "legacy": True,
        } | ({"chat_template": chat_template} if chat_template else {})
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    # safetensors creates its files owner-only (0600); a model folder is meant to be shared like any other.
    umask = os.umask(0)
    os.umask(umask)
    for file in staging.iterdir():
        file.chmod(0o666 & ~umask)
    if directory.exists():
        directory.rmdir()
    staging.rename(directory)
    return directory
