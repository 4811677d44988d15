"""Find, read and convert a checkpoint into a `Llama` with HF names: `load_checkpoint(source)`.

Formats: an HF directory, a hub repo id, Meta's params.json + consolidated.NN.pth, a llama2.c `.bin`, a
GGUF file (llama.cpp's; Q8_0 / Q4_0 / Q4_K / Q5_K / Q6_K linear weights can stay as stored, other quantized types
as int8);
an HF folder written by `llamaforge quantize` (int8 / int4 layers, quantized.py);
the name `demo` is the small chat model shipped inside the package (built by recipes/demo/run.py).
The config is checked against the tensors the checkpoint's headers list (inventory.py) before a model is
built from it. Tensors then stream one at a time into a model built on the meta device, each cast to the
target dtype as it arrives, so loading never holds the checkpoint and the model in memory at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaforge.checkpoint import gguf, hf, hub, inventory, llama2c, meta, quantized
from llamaforge.checkpoint.keymaps import IGNORED_KEYS
from llamaforge.config import DEMO, ModelArgs
from llamaforge.errors import CheckpointError, LlamaforgeError, TokenizerError
from llamaforge.model import Llama
from llamaforge.quantize import QuantizedLinear, QuantizedWeight
from llamaforge.tokenizer import Tokenizer, find_tokenizer

FORMATS = ("hf", "meta", "llama2c", "gguf")
DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / DEMO
HELP = (
    "pass an HF directory (config.json + *.safetensors), a hub repo id like meta-llama/Llama-2-7b-chat-hf, "
    "a Meta download directory (params.json + consolidated.00.pth + tokenizer.model), a llama.cpp .gguf file "
    "or a llama2.c .bin file"
)


@dataclass
class Checkpoint:
    """A loaded model with what was learnt about where it came from."""

    config: ModelArgs
    model: Llama
    tokenizer: Tokenizer | None
    format: str
    path: Path


def resolve(source: str | Path) -> Path:
    """A local path for `demo`, a path or a hub repo id; a clear error for none of them."""
    if source == DEMO:
        if not hf.is_hf_dir(DEMO_DIR):
            raise CheckpointError(f"the built-in demo model is missing from this install ({DEMO_DIR}); reinstall "
                                  "llamaforge, or rebuild it with `python recipes/demo/run.py --install`")
        return DEMO_DIR
    path = Path(source).expanduser()
    if path.exists():
        return path
    if isinstance(source, str) and hub.looks_like_repo_id(source):
        return hub.download(source)
    raise CheckpointError(f"{source} does not exist; {HELP}")


def detect_format(path: Path) -> str:
    """Which of FORMATS a local path holds."""
    if hf.is_hf_dir(path):
        return "hf"
    if meta.is_meta_dir(path):
        return "meta"
    if path.is_file() and path.suffix == ".bin" and path.stat().st_size >= llama2c.HEADER.size:
        return "llama2c"
    if gguf.is_gguf(path):
        return "gguf"
    if (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is a LoRA adapter, not a model: pass it as --adapter {path}, with --model "
                              f"the base it was trained on ({_adapter_base(path)})")
    raise CheckpointError(f"{path} is not a checkpoint llamaforge recognises; {HELP}")


def _adapter_base(path: Path) -> str:
    """What an adapter's config names as its base model, for the message that points there."""
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    return f"its adapter_config.json says {base}" if base else "its adapter_config.json does not say which"


def pick_device(device: str | torch.device | None) -> torch.device:
    """The device named (checked to be one this machine has), else CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise LlamaforgeError(f"device {str(device)!r} is not one torch knows; use cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise LlamaforgeError(f"device {str(device)!r}: this machine has no CUDA GPU that torch can use (or torch is "
                              "a CPU build); use --device cpu")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise LlamaforgeError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise LlamaforgeError(f"device {str(device)!r}: Apple's MPS is not available here; use --device cpu")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise LlamaforgeError(f"device {str(device)!r}: llamaforge runs on cpu, cuda or mps")
    return chosen


def load_checkpoint(source: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                    tokenizer: str | Path | None = None, keep_quantized: bool = False,
                    quantize: Callable[[str, torch.Tensor], QuantizedWeight] | None = None) -> Checkpoint:
    """Load model and tokenizer; dtype None keeps the stored dtype, device None picks CUDA when present.

    `keep_quantized`: a GGUF's quantized linear weights become QuantizedLinear layers (Q8_0 / Q4_0 and the k-quants
    Q4_K / Q5_K / Q6_K as stored, see gguf.kept_bits), and the default dtype of everything else is then bfloat16,
    the kernel's activations. `quantize` (see build_model) quantizes the other linear weights as they are read.
    """
    path = resolve(source)
    kind = detect_format(path)
    device = pick_device(device)
    if kind == "hf":
        config = hf.read_config(path)
        found = hf.read_inventory(path)
        layers = quantized.quantized_layers(path)  # a folder `llamaforge quantize` wrote: int8 / int4 layers
        if layers is not None:
            quantized.check_inventory(config, found, layers)
        inventory.check(config, found)
        dtype = dtype or hf.stored_dtype(path)
        tensors = hf.iter_tensors(path, None if layers else dtype, device)
        if layers is not None:
            tensors = quantized.group_tensors(tensors, layers, quantized.in_features_of(config, layers))
    elif kind == "meta":
        shards = meta.open_shards(path)
        config = meta.read_config(path, shards)
        inventory.check(config, meta.read_inventory(path, shards))
        tensors = meta.iter_tensors(config, shards)
    elif kind == "gguf":
        reader = gguf.open_reader(path)  # opened once: the tokenizer is read from it too
        config = gguf.read_config(reader, path)
        inventory.check(config, gguf.read_inventory(reader, path))
        dtype = dtype or (torch.bfloat16 if keep_quantized and gguf.has_kept_types(reader)
                          else gguf.stored_dtype(reader))
        tensors = gguf.iter_tensors(reader, config, keep_quantized)
    else:  # the header is the config, and read_header has checked the file's size against it
        config, shared = llama2c.read_header(path)
        tensors = llama2c.iter_tensors(path, config, shared)
    model = build_model(config, tensors, dtype, device, quantize)
    if tokenizer:
        loaded_tokenizer = Tokenizer(tokenizer)
    else:
        loaded_tokenizer = gguf.read_tokenizer(reader, path) if kind == "gguf" else read_tokenizer(path, kind)
    if loaded_tokenizer is not None:
        check_vocab(loaded_tokenizer, config)
    return Checkpoint(config, model, loaded_tokenizer, kind, path)


def read_tokenizer(path: Path, kind: str) -> Tokenizer | None:
    """The tokenizer a checkpoint comes with, read without its weights; None when it has none."""
    if kind == "gguf":  # the vocabulary is inside the file
        return gguf.read_tokenizer(gguf.open_reader(path), path)
    found = tokenizer_file(path, kind)
    return Tokenizer(found) if found else None


def tokenizer_file(path: Path, kind: str) -> Path | None:
    """Where a checkpoint keeps its tokenizer file, found without reading any weights."""
    if kind == "hf":
        return find_tokenizer(path)
    if kind == "meta":  # Meta's download puts tokenizer.model one level above the size folders
        return find_tokenizer(path) or find_tokenizer(path.parent)
    # llama2.c keeps it beside the model: tokenizer.model / tok512.model, or the .bin form.
    vocab_size = llama2c.read_header(path)[0].vocab_size
    for name in ("tokenizer.model", f"tok{vocab_size}.model", "tokenizer.bin", f"tok{vocab_size}.bin"):
        candidate = path.parent / name
        if candidate.is_file() and candidate != path:
            return candidate
    return None


def check_vocab(tokenizer: Tokenizer, config: ModelArgs) -> None:
    """Refuse a tokenizer whose vocabulary does not match the model's embedding rows."""
    if tokenizer.vocab_size != config.vocab_size:
        raise TokenizerError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model has "
            f"{config.vocab_size} embedding rows; pass the tokenizer that was trained with these weights"
        )


def build_model(config: ModelArgs, tensors: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
                dtype: torch.dtype | None, device: torch.device,
                quantize: Callable[[str, torch.Tensor], QuantizedWeight] | None = None) -> Llama:
    """Fill a meta-device model with streamed tensors, each cast on arrival.

    The tensors' names and shapes are those `inventory.check` has compared with the config; their dtype is
    known only now. `quantize(name, weight)` (quantize.weight_quantizer), where given, turns each linear weight into
    its QuantizedWeight as it arrives (cast first), so the float model is never whole in memory.
    """
    with torch.device("meta"):
        model = Llama(config)
    linears = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    loaded: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()  # state keys of the layers built whole from a QuantizedWeight
    for name, tensor in tensors:
        if IGNORED_KEYS.search(name):
            continue
        if quantize is not None and name in linears and torch.is_tensor(tensor) and tensor.is_floating_point():
            tensor = quantize(name, tensor.to(device=device, dtype=dtype or tensor.dtype))
        if isinstance(tensor, QuantizedWeight):  # a linear layer stored quantized: it becomes one as it is
            layer = name.removesuffix(".weight")
            model.set_submodule(layer, QuantizedLinear(tensor).to(device))
            quantized |= {f"{layer}.codes", f"{layer}.scales"}
            continue
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {name} is stored as {tensor.dtype}, not as floats; a Llama checkpoint "
                                  "stores float weights (for a quantized model, load its GGUF)")
        dtype = dtype or tensor.dtype
        loaded[name] = tensor.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        loaded.setdefault("lm_head.weight", loaded["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(loaded, assign=True, strict=False)
    if unexpected or set(missing) != quantized:
        raise CheckpointError("the checkpoint's tensors do not fill the model: missing "
                              f"{sorted(set(missing) - quantized)}, unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
