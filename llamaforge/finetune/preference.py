"""Preference pairs and the losses that learn from them (DPO, IPO, robust DPO): the second half of the Llama 2 chat
recipe, after supervised fine-tuning.

A pair is a prompt (a dialog ending with the user's turn) and two answers, the chosen and the rejected one. The
layouts trl reads are accepted: standard (`prompt`, `chosen`, `rejected` strings), conversational (`prompt` a list
of messages, `chosen` and `rejected` lists holding the assistant's message), implicit prompt (`chosen` and
`rejected` whole dialogs sharing everything before their last assistant turn, as HH-RLHF's are), and HH-RLHF's own
text ("\\n\\nHuman: ... \\n\\nAssistant: ..."). Each answer is encoded after its prompt in the Llama 2 chat format
exactly as supervised examples are (llamaforge.finetune.data), and only the answer's tokens and its EOS are scored.

The losses compare the policy's log-probability of each answer with the reference model's (the model before this
training): with logratio = log pi(answer) - log pi_ref(answer) and delta = logratio(chosen) - logratio(rejected),
  sigmoid (DPO):  -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta)   (e > 0: conservative DPO)
  ipo:            (delta per answer token - 1 / (2 beta))^2
  robust:         (-(1 - e) log sigmoid(beta delta) + e log sigmoid(-beta delta)) / (1 - 2e)
as trl 1.x computes them (its `sigmoid` has no label smoothing; conservative DPO is trl 0.x's `sigmoid` with
`label_smoothing`). The rewards trl logs are beta * logratio. Any of them may add the chosen answers' negative
log-likelihood per token times rpo_alpha (RPO, Pang et al. 2024; trl's loss_type ["sigmoid", "sft"]): DPO alone can
lower the chosen answer's probability as long as the rejected one's falls faster, which on small or narrow data
turns into answers the model never gave; the NLL term holds the chosen answers up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llamaforge.chat import encode_dialog, validate_dialog
from llamaforge.errors import ChatFormatError
from llamaforge.finetune.data import DataError, Record, encode_chat
from llamaforge.kv_blocks import shared_prefix
from llamaforge.tokenizer import Tokenizer

LOSS_TYPES = ("sigmoid", "ipo", "robust")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass
class PreferencePair:
    """A prompt (messages ending with the user's turn) and the answer preferred to the other."""

    prompt: list[dict]
    chosen: str
    rejected: str


@dataclass
class EncodedPair:
    """Token ids of a pair: the prompt, then each answer with its EOS (the tokens a preference loss scores)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def to_pair(record: Record) -> PreferencePair:
    """The pair in a record of any accepted layout; DataError naming the record's line and what is wrong."""
    try:
        return pair_of(record.data)
    except DataError as exc:
        raise DataError(f"{record.where}: {exc}") from None


def is_pair(data: object) -> bool:
    """Whether a record is a preference pair (it has `chosen` and `rejected`)."""
    return isinstance(data, dict) and "chosen" in data and "rejected" in data


def pair_of(data: object) -> PreferencePair:
    """The pair in a record's data; DataError saying what is wrong (without the record's place)."""
    try:
        if not is_pair(data):
            fields = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DataError(f"a preference pair needs 'chosen' and 'rejected' (and usually 'prompt'); got {fields}")
        if "prompt" in data:
            prompt = data["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            pair = PreferencePair(_messages(messages, "prompt"), _answer(data["chosen"], "chosen"),
                                  _answer(data["rejected"], "rejected"))
        else:
            pair = _implicit_prompt(data["chosen"], data["rejected"])
        check_pair(pair)
    except ChatFormatError as exc:
        raise DataError(str(exc)) from None
    return pair


def check_pair(pair: PreferencePair) -> None:
    """Raise DataError if the pair cannot teach anything: an empty answer, two equal ones, or a prompt that does not
    end with the user's turn."""
    if not pair.prompt or pair.prompt[-1].get("role") != "user":
        role = pair.prompt[-1].get("role") if pair.prompt else None
        raise DataError(f"the prompt must end with a user turn for the answers to reply to, not {role!r}")
    validate_dialog(pair.prompt)
    for name in ("chosen", "rejected"):
        if not getattr(pair, name).strip():
            raise DataError(f"{name} is empty")
    if pair.chosen.strip() == pair.rejected.strip():
        raise DataError("chosen and rejected are the same answer; the pair teaches nothing")


def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise DataError(f"{field!r} must be a string or a list of {{role, content}} messages, "
                        f"not {type(value).__name__}")
    return [{"role": m.get("role"), "content": m.get("content")} for m in value]


def _answer(value, field: str) -> str:
    """An answer given as a string or as a list holding one assistant message (trl's conversational layout)."""
    if isinstance(value, str):
        return value
    messages = _messages(value, field)
    if len(messages) != 1 or messages[0]["role"] != "assistant" or not isinstance(messages[0]["content"], str):
        raise DataError(f"{field!r} must be a string or a list holding one assistant message")
    return messages[0]["content"]


def _implicit_prompt(chosen, rejected) -> PreferencePair:
    """Two whole dialogs (lists of messages, or HH-RLHF text) that share everything before their last answer."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        chosen, rejected = _hh_dialog(chosen, "chosen"), _hh_dialog(rejected, "rejected")
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    for name, dialog in (("chosen", chosen), ("rejected", rejected)):
        if not dialog or dialog[-1]["role"] != "assistant":
            raise DataError(f"without a 'prompt', {name!r} must be a whole dialog ending with the assistant's answer")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("without a 'prompt', chosen and rejected must be the same dialog up to their last "
                        "assistant turn; they differ before it")
    return PreferencePair(chosen[:-1], chosen[-1]["content"] or "", rejected[-1]["content"] or "")


def _hh_dialog(text: str, field: str) -> list[dict]:
    """HH-RLHF's "\\n\\nHuman: ...\\n\\nAssistant: ..." text as messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{field!r} is neither a dialog nor HH-RLHF text (\"\\n\\nHuman: ... \\n\\nAssistant: ...\")")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2],
                                                                                              strict=True)]


def encode_pair(tokenizer: Tokenizer, pair: PreferencePair) -> EncodedPair:
    """The pair in the Llama 2 chat format: each answer encoded after the prompt as a supervised example is; the
    answer starts where that encoding leaves the prompt's own (what generation feeds), as trl splits them."""
    prompt = encode_dialog(tokenizer, pair.prompt)
    chosen = encode_chat(tokenizer, [*pair.prompt, {"role": "assistant", "content": pair.chosen}]).input_ids
    rejected = encode_chat(tokenizer, [*pair.prompt, {"role": "assistant", "content": pair.rejected}]).input_ids
    shared = min(shared_prefix(prompt, chosen), shared_prefix(prompt, rejected))
    return EncodedPair(prompt[:shared], chosen[shared:], rejected[shared:])


def pair_batch(pairs: list[EncodedPair], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, prompt + answer, right-padded: input_ids (2B, T), completion_mask (2B, T), 1 on
    the answer tokens (the ones scored), and lengths (2B,), each row's tokens before its padding."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    lengths = torch.tensor([len(prompt) + len(answer) for prompt, answer in rows])
    input_ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    completion_mask = torch.zeros_like(input_ids)
    for row, (prompt, answer) in enumerate(rows):
        input_ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        completion_mask[row, len(prompt):len(prompt) + len(answer)] = 1
    return {"input_ids": input_ids, "completion_mask": completion_mask, "lengths": lengths}


def answer_logps(model: torch.nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its answer tokens under `model`: input_ids (R, T) -> (R,). Logits are
    computed only where the next token is an answer token (a 32k vocabulary's logits of whole rows would not fit)."""
    predicts = F.pad(completion_mask[:, 1:] == 1, (0, 1), value=False)  # (R, T): token t predicts answer token t+1
    logits = model(input_ids, logits_at=predicts)  # (N, V)
    targets = input_ids[:, 1:][completion_mask[:, 1:] == 1]  # (N,), in the same row-major order
    logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 1, targets[:, None])[:, 0]  # (N,)
    rows = predicts.nonzero()[:, 0]  # (N,): the row of each
    return torch.zeros(input_ids.shape[0], device=logps.device, dtype=logps.dtype).index_add(0, rows, logps)


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None, rpo_alpha: float = 0.0,
                    nll_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over a batch of pairs (each argument (B,): summed answer log-probabilities; the token counts
    for ipo and rpo_alpha) and the metrics trl logs for it. See the module docstring for the formulas. rpo_alpha > 0
    adds that times the chosen answers' negative log-likelihood per token, averaged over `nll_tokens` tokens (None:
    the batch's chosen tokens, as trl does; the trainer gives the step's share, so that a step's loss does not
    depend on how it is split into micro-batches)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label smoothing must be in [0, 0.5), got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be 0 (off) or positive, got {rpo_alpha}")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs each answer's token count")
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    metrics = {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
               "logps/chosen": chosen_logps.detach().mean().item(),
               "logps/rejected": rejected_logps.detach().mean().item()}
    if rpo_alpha:
        if chosen_tokens is None:
            raise ValueError("rpo_alpha needs the chosen answers' token counts")
        nll = -chosen_logps.sum()
        per = max(float(chosen_tokens.sum()), 1.0) if nll_tokens is None else nll_tokens
        loss = loss + rpo_alpha * nll / per
        metrics["nll_loss"] = nll.item() / per  # the term's own mean, over the same tokens
    return loss, metrics
