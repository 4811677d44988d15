"""Reward models: a Llama whose output layer is one number (HF's `LlamaForSequenceClassification` with one label,
what trl's RewardTrainer trains), read at a sequence's last token, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)).

Here the model is llamaforge's Llama with `lm_head` a (1, dim) layer; saved, that layer is `score.weight` and
config.json says `LlamaForSequenceClassification`, `num_labels` 1, so transformers and trl load it as theirs. A LoRA
or QLoRA reward model is a peft adapter of task SEQ_CLS with the head as modules_to_save (`score.weight`), as peft
saves trl's: transformers' LlamaForSequenceClassification of the base (num_labels 1) and peft's PeftModel load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.chat import JINJA_TEMPLATE
from llamaforge.checkpoint import read_tokenizer
from llamaforge.checkpoint.hf import iter_tensors, read_config, save_hf_dir
from llamaforge.config import ModelArgs
from llamaforge.errors import LlamaforgeError
from llamaforge.finetune.data import encode_chat, load_records, prepare_record
from llamaforge.finetune.preference import encode_pair, is_pair, to_pair
from llamaforge.lora import ADAPTER_CONFIG, apply_adapter, merge_lora, read_adapter, save_adapter
from llamaforge.model import Llama
from llamaforge.tokenizer import Tokenizer

ARCHITECTURE = "LlamaForSequenceClassification"
HEAD = "score.weight"  # the output layer's name in HF's reward models
ADAPTER_TASK = "SEQ_CLS"  # peft's task type of a LoRA reward model
PAD_ID = 0  # Llama's unknown token: padding a reward model reads past (EOS must stay the token the reward is read at)


class RewardModelError(LlamaforgeError):
    """A folder that is not a reward model, or one that does not fit."""


def add_reward_head(model: Llama, seed: int = 0, std: float = 0.02, dtype: torch.dtype | None = None) -> Llama:
    """Replace the model's output layer by a fresh (1, dim) one (normal(0, std), as transformers initialises
    `score`; in `dtype`, default the embeddings'), in place: the model then gives one number per position."""
    head = nn.Linear(model.config.dim, 1, bias=False, device=model.model.embed_tokens.weight.device,
                     dtype=dtype or model.model.embed_tokens.weight.dtype)
    with torch.no_grad():
        head.weight.normal_(0.0, std, generator=torch.Generator(head.weight.device).manual_seed(seed))
    model.lm_head = head
    model.config = model.config.replace(tie_word_embeddings=False)
    return model


def sequence_rewards(model: Llama, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's reward, read at its last token: input_ids (R, T) right-padded, lengths (R,) -> (R,) float32."""
    return model(input_ids, logits_at=(lengths - 1).to(input_ids.device))[:, 0].float()


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry's mean loss over pairs (chosen, rejected (B,)) and the metrics trl's RewardTrainer logs."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    both = torch.cat([chosen, rejected]).detach()
    metrics = {"accuracy": (chosen > rejected).float().mean().item(),
               "margin": (chosen - rejected).detach().mean().item(), "mean_reward": both.mean().item(),
               "min_reward": both.min().item(), "max_reward": both.max().item()}
    return loss, metrics


def save_reward_model(state: dict[str, torch.Tensor], config: ModelArgs, tokenizer: Tokenizer, directory: str | Path,
                      dtype: torch.dtype | None = None) -> Path:
    """Write a reward model's state as an HF `LlamaForSequenceClassification` folder (its pad token PAD_ID)."""
    state = {(HEAD if name == "lm_head.weight" else name): tensor for name, tensor in state.items()}
    extra = {"architectures": [ARCHITECTURE], "num_labels": 1, "id2label": {"0": "LABEL_0"},
             "label2id": {"LABEL_0": 0}, "pad_token_id": PAD_ID, "tie_word_embeddings": False}
    return save_hf_dir(state, config, directory, tokenizer, dtype, chat_template=JINJA_TEMPLATE,
                       extra_config=extra)


def save_reward_adapter(model: Llama, weights: dict[str, torch.Tensor], base_model: str, directory: str | Path) -> Path:
    """Write a LoRA reward model (`weights`: its trainable tensors by our names) as peft saves one: the adapters and
    the head as `score.weight`, task SEQ_CLS."""
    return save_adapter(model, directory, base_model=base_model, weights=weights, task_type=ADAPTER_TASK,
                        saved={HEAD: weights["lm_head.weight"]})


def load_reward_model(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> tuple[Llama, Tokenizer]:
    """A reward model folder (ours, or transformers' / trl's `LlamaForSequenceClassification` with one label; or a
    LoRA reward model's peft adapter, on its base) and its tokenizer; RewardModelError when it is something else."""
    path = Path(path)
    adapter_config = path / ADAPTER_CONFIG
    if adapter_config.is_file():
        return _load_reward_adapter(path, json.loads(adapter_config.read_text()), device, dtype)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RewardModelError(f"{path} is not a model folder (no config.json)")
    hf_config = json.loads(config_file.read_text())
    if ARCHITECTURE not in hf_config.get("architectures", []) or hf_config.get("num_labels", 2) != 1:
        raise RewardModelError(f"{path} is not a reward model: its config.json needs architectures "
                               f"[{ARCHITECTURE!r}] and num_labels 1 (a chat model scores nothing)")
    config = read_config(path).replace(tie_word_embeddings=False)
    with torch.device("meta"):
        model = Llama(config)
    model.lm_head = nn.Linear(config.dim, 1, bias=False, device="meta")
    state = {("lm_head.weight" if name == HEAD else name): tensor for name, tensor in iter_tensors(path, dtype)}
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise RewardModelError(f"{path} lacks {len(missing)} tensors of a reward model (e.g. {sorted(missing)[0]})")
    model.load_state_dict(state, strict=False, assign=True)
    tokenizer = read_tokenizer(path, "hf")
    if tokenizer is None:
        raise RewardModelError(f"{path} has no tokenizer beside its weights")
    return model.to(device).eval(), tokenizer


def _load_reward_adapter(path: Path, settings: dict, device: str | torch.device,
                         dtype: torch.dtype) -> tuple[Llama, Tokenizer]:
    """A LoRA reward model: its base loaded, the adapters merged into it and its head put on."""
    from llamaforge.api import load

    base = settings.get("base_model_name_or_path")
    if settings.get("task_type") != ADAPTER_TASK or not base:
        raise RewardModelError(f"{path} is an adapter of task {settings.get('task_type')!r}, not a reward model's "
                               f"({ADAPTER_TASK!r}, with its base model named in {ADAPTER_CONFIG})")
    config, tensors = read_adapter(path, saved_modules=("classifier", "score"))
    head = tensors.pop(HEAD, None)
    if head is None:
        raise RewardModelError(f"{path} has no {HEAD} (the reward head) beside its adapters")
    llm = load(base, dtype=dtype, device="cpu")
    model = merge_lora(apply_adapter(llm.model, config, tensors, path))
    if tuple(head.shape) != (1, model.config.dim):
        raise RewardModelError(f"{path}'s {HEAD} has shape {tuple(head.shape)}; its base {base} needs "
                               f"(1, {model.config.dim})")
    add_reward_head(model, dtype=dtype)
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
    return model.to(device).eval(), llm.tokenizer


@torch.no_grad()
def score_records(model: Llama, tokenizer: Tokenizer, source: str, batch_size: int = 8) -> list[dict]:
    """Rewards of a file's records, in order: a preference pair's chosen and rejected answers after its prompt
    ({"where", "chosen", "rejected"}), or a chat record's whole dialog ({"where", "reward"})."""
    rows: list[tuple[str, str, list[int]]] = []  # (where, which, token ids)
    for record in load_records(source):
        if is_pair(record.data):
            pair = encode_pair(tokenizer, to_pair(record))
            rows += [(record.where, "chosen", pair.prompt_ids + pair.chosen_ids),
                     (record.where, "rejected", pair.prompt_ids + pair.rejected_ids)]
        else:
            rows.append((record.where, "reward", prepare_record(tokenizer, record).input_ids))
    scored: dict[str, dict] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for _, _, ids in chunk)
        input_ids = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for _, _, ids in chunk])
        lengths = torch.tensor([len(ids) for _, _, ids in chunk])
        rewards = sequence_rewards(model, input_ids.to(model.lm_head.weight.device), lengths).tolist()
        for (where, which, _), reward in zip(chunk, rewards, strict=True):
            scored.setdefault(where, {"where": where})[which] = reward
    return list(scored.values())


class RewardModelScorer:
    """A reward model as `llamaforge sample`'s reward: scorer(messages, answer) is its reward of the answer after
    the prompt, encoded as training encodes it."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.model, self.tokenizer = load_reward_model(path, device)
        self.spec = f"the reward model {path}"

    @torch.no_grad()
    def __call__(self, messages: list[dict], answer: str) -> float:
        ids = encode_chat(self.tokenizer, [*messages, {"role": "assistant", "content": answer}]).input_ids
        input_ids = torch.tensor([ids], device=self.model.lm_head.weight.device)
        return float(sequence_rewards(self.model, input_ids, torch.tensor([len(ids)]))[0])
