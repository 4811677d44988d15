"""`finetune --objective dpo`: the fine-tuning loop (LoRA, QLoRA or full; checkpoints, resume, FSDP2) on preference
pairs, with the DPO, IPO or robust DPO loss of `finetune.preference`.

Each pair is one row (never packed); a step's loss is the mean of its pairs' losses, whatever the split into
micro-batches and ranks. The reference is the model before training: its log-probabilities of every answer are
computed once, before the first step (for LoRA and QLoRA that is the base, the new adapter's B being zero; for full
training the initial weights), so no second copy of the model is kept. A resumed run computes them again from the
same initial weights, before it loads its checkpoint. The metrics trl logs (rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected; nll_loss with --rpo-alpha) go into metrics.jsonl and
TensorBoard beside the loss, and the held-out pairs' into the validation records (val_rewards/accuracies ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from llamaforge.finetune import distributed
from llamaforge.finetune.data import DataError, load_records
from llamaforge.finetune.plan import Plan, plan_run
from llamaforge.finetune.preference import EncodedPair, answer_logps, encode_pair, pair_batch, preference_loss, to_pair
from llamaforge.finetune.reward import (
    PAD_ID,
    add_reward_head,
    reward_loss,
    save_reward_adapter,
    save_reward_model,
    sequence_rewards,
)
from llamaforge.finetune.trainer import Trainer, autocast


@dataclass
class PairRow:
    """A training row of preference tuning: one encoded pair and its reference log-probabilities."""

    pair: EncodedPair
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0
    n_labels = 1  # a step's loss is the sum of its rows' losses over this count: the mean over pairs

    @property
    def input_ids(self) -> list[int]:
        """Every token the row feeds (both answers after their prompt), for token counts."""
        pair = self.pair
        return pair.prompt_ids + pair.chosen_ids + pair.prompt_ids + pair.rejected_ids


class PreferenceTrainer(Trainer):
    """The fine-tuning loop with a preference loss (see the module docstring)."""

    def _plan(self) -> Plan:
        rows, self.data_notes = encode_pairs(self.config.data, self.tokenizer, self.config.seq_len,
                                             self.config.on_long)
        self._before_training(rows)
        return plan_run(dataclasses.replace(self.config, pack=False), rows, self.global_batch,
                        self.model.config.dim, rows_of=list)

    @torch.no_grad()
    def _before_training(self, rows: list[PairRow]) -> None:
        """The reference: each pair's answers' log-probabilities under the model as it is now, before any step."""
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(rows), self.config.batch_size):
            chunk = rows[start:start + self.config.batch_size]
            logps = self._answer_logps(self._collate(chunk)).tolist()
            for row, chosen, rejected in zip(chunk, logps[:len(chunk)], logps[len(chunk):], strict=True):
                row.ref_chosen, row.ref_rejected = chosen, rejected
        self.model.train(was_training)

    def _collate(self, rows: list[PairRow]) -> dict[str, torch.Tensor]:
        batch = pair_batch([row.pair for row in rows], self.tokenizer.eos_id)
        batch["ref_chosen"] = torch.tensor([row.ref_chosen for row in rows], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([row.ref_rejected for row in rows], dtype=torch.float32)
        return batch

    def _answer_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.info.device
        with autocast(device, self.precision):
            return answer_logps(self.model, batch["input_ids"].to(device), batch["completion_mask"].to(device))

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of a micro-batch's pairs; their metrics are added to the step's."""
        logps = self._answer_logps(batch)
        pairs = logps.shape[0] // 2
        tokens = batch["completion_mask"].sum(dim=1).to(logps.device)
        config = self.config
        # The NLL term's tokens: this micro-batch's share of the step's chosen tokens, so that after the step's
        # division by its pairs it is the step's mean per chosen token.
        nll_tokens = self.step_chosen_tokens * pairs / self.step_pairs
        loss, metrics = preference_loss(logps[:pairs], logps[pairs:], batch["ref_chosen"].to(logps.device),
                                        batch["ref_rejected"].to(logps.device), config.beta, config.loss_type,
                                        config.label_smoothing, tokens[:pairs], tokens[pairs:], config.rpo_alpha,
                                        nll_tokens)
        self._add_metrics(metrics, pairs)
        return loss * pairs

    def _add_metrics(self, metrics: dict[str, float], pairs: int) -> None:
        """Add a micro-batch's metrics (means over its `pairs`) to the step's."""
        for name, value in metrics.items():
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value * pairs
        self.metric_pairs += pairs

    def _start_step(self, rows: list[PairRow]) -> None:
        self.metric_sums: dict[str, float] = {}
        self.metric_pairs = 0
        self._count_chosen(rows)

    def _train_step(self) -> dict:
        return super()._train_step() | self._metric_means()

    def _count_chosen(self, rows: list[PairRow]) -> None:
        """The pairs and chosen answer tokens of a step (or of the validation rows), over every rank."""
        self.step_pairs = len(rows)
        self.step_chosen_tokens = sum(len(row.pair.chosen_ids) for row in rows)

    def _eval_loss(self, rows: list[PairRow], counted: bool) -> float:
        sums, pairs = dict(self.metric_sums), self.metric_pairs
        value = super()._eval_loss(rows, counted)
        if not counted:  # a stand-in batch's metrics are not the validation's
            self.metric_sums, self.metric_pairs = sums, pairs
        return value

    def _validation(self) -> dict[str, float]:
        """The validation loss and the step metrics on the held-out pairs (val_rewards/accuracies ...)."""
        self.metric_sums, self.metric_pairs = {}, 0
        self._count_chosen(self.val_rows)
        return super()._validation() | self._metric_means("val_")

    def _metric_means(self, prefix: str = "") -> dict[str, float]:
        """Each metric's mean over the pairs added since the sums were reset, over every rank."""
        pairs = distributed.all_sum(self.metric_pairs, self.info)
        return {prefix + name: distributed.all_sum(value, self.info) / pairs
                for name, value in sorted(self.metric_sums.items())}


def encode_pairs(data: str, tokenizer, seq_len: int, on_long: str) -> tuple[list[PairRow], list[str]]:
    """The pairs of a data file or dataset as rows, and notes on the ones cut or dropped for `seq_len`: a pair whose
    prompt and longer answer exceed it has its answers cut at the end (--on-long truncate), is dropped, or stops
    the run (error); one whose prompt alone leaves no room for an answer is dropped either way."""
    rows, notes = [], []
    for record in load_records(data):
        encoded = encode_pair(tokenizer, to_pair(record))
        longest = len(encoded.prompt_ids) + max(len(encoded.chosen_ids), len(encoded.rejected_ids))
        if longest > seq_len:
            if on_long == "error":
                raise DataError(f"{record.where}: the prompt and its longer answer are {longest} tokens, over "
                                f"--seq-len {seq_len}; raise it, or pass --on-long truncate or drop")
            room = seq_len - len(encoded.prompt_ids)
            if on_long == "drop" or room < 1:
                notes.append(f"{record.where}: {longest} tokens, over --seq-len {seq_len}: dropped")
                continue
            encoded = EncodedPair(encoded.prompt_ids, encoded.chosen_ids[:room], encoded.rejected_ids[:room])
            notes.append(f"{record.where}: {longest} tokens, answers cut to {room}")
        rows.append(PairRow(encoded))
    if not rows:
        raise DataError(f"no usable pairs in {data} (all longer than --seq-len {seq_len}?)")
    return rows, notes


class RewardTrainer(PreferenceTrainer):
    """`finetune --objective reward`: the model with a one-number head (finetune.reward), trained with the
    Bradley-Terry loss on each pair's two whole sequences; written as an HF LlamaForSequenceClassification."""

    def _before_training(self, rows: list[PairRow]) -> None:
        # Before the optimizer is made: the head trains with the rest (in float32 beside adapters, as they do).
        add_reward_head(self.model, self.config.seed, dtype=torch.float32 if self.config.method != "full" else None)

    def _collate(self, rows: list[PairRow]) -> dict[str, torch.Tensor]:
        return pair_batch([row.pair for row in rows], PAD_ID)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.info.device
        with autocast(device, self.precision):
            rewards = sequence_rewards(self.model, batch["input_ids"].to(device), batch["lengths"].to(device))
        pairs = rewards.shape[0] // 2
        loss, metrics = reward_loss(rewards[:pairs], rewards[pairs:])
        self._add_metrics(metrics, pairs)
        return loss * pairs

    def _save_model(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        save_reward_model(state, self.model.config, self.tokenizer, self.out / "model", dtype)

    def _save_adapter(self, weights: dict[str, torch.Tensor]) -> None:
        save_reward_adapter(self.model, weights, self.base_name, self.out)
