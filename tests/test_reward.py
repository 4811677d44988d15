"""Reward models (`finetune --objective reward`, `llamaforge score`): trl 1.x's RewardTrainer's tokens, loss and
gradients at step 0, a saved model transformers loads as LlamaForSequenceClassification with the same rewards,
and training that learns to rank the demo model's right sums over wrong ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_preference import PAIRS, arithmetic_pairs

from llamaforge.finetune.data import Record
from llamaforge.finetune.preference import encode_pair, pair_batch, to_pair
from llamaforge.finetune.reward import (
    PAD_ID,
    RewardModelError,
    add_reward_head,
    load_reward_model,
    reward_loss,
    save_reward_model,
    sequence_rewards,
)

CONFIG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=128, max_seq_len=128)


@pytest.fixture
def reward_dir(tmp_path: Path, tiny_tokenizer_path: Path) -> Path:
    from factories import random_model

    from llamaforge.config import ModelArgs
    from llamaforge.tokenizer import Tokenizer

    model = add_reward_head(random_model(ModelArgs(**CONFIG), seed=4), seed=1, std=0.5)
    return save_reward_model(model.state_dict(), model.config, Tokenizer(tiny_tokenizer_path), tmp_path / "rm")


def batch_of(tokenizer, pairs: list[dict]) -> tuple[dict, torch.Tensor]:
    encoded = [encode_pair(tokenizer, to_pair(Record(f"row {i}", p))) for i, p in enumerate(pairs, start=1)]
    batch = pair_batch(encoded, PAD_ID)
    return batch, batch["lengths"]


def test_transformers_reads_the_same_rewards(reward_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, tokenizer = load_reward_model(reward_dir)
    batch, lengths = batch_of(tokenizer, PAIRS)
    ours = sequence_rewards(model, batch["input_ids"], lengths)
    theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32)
    attention = (torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        theirs = theirs_model(input_ids=batch["input_ids"], attention_mask=attention).logits[:, 0]
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-5, rtol=1e-5)
    assert ours.std() > 0.01  # the rewards differ between sequences: the comparison means something


@pytest.mark.slow
def test_step_zero_equals_trl_reward_trainer(reward_dir: Path, tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(reward_dir)
    hf_tokenizer.pad_token = hf_tokenizer.unk_token
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), report_to=[],
                            use_cpu=True, bf16=False, max_length=None, dataset_num_proc=None, seed=0)
    trainer = trl.RewardTrainer(model=theirs_model, args=args, processing_class=hf_tokenizer,
                                train_dataset=datasets.Dataset.from_list(PAIRS))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    theirs = {name.replace("score.weight", "lm_head.weight"): p.grad for name, p in trainer.model.named_parameters()}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    model, tokenizer = load_reward_model(reward_dir)
    model.train()
    ours_batch, lengths = batch_of(tokenizer, PAIRS)
    their_rows = {tuple(row["chosen_ids"]) for row in trainer.train_dataset}
    ours_rows = {tuple(ids[:n].tolist()) for ids, n in zip(ours_batch["input_ids"][:len(PAIRS)], lengths, strict=False)}
    assert ours_rows == their_rows  # trl's tokens
    rewards = sequence_rewards(model, ours_batch["input_ids"], lengths)
    ours_loss, ours_metrics = reward_loss(rewards[:len(PAIRS)], rewards[len(PAIRS):])
    ours_loss.backward()
    assert ours_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    for name in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert ours_metrics[name] == pytest.approx(metrics[name], abs=1e-5), name
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_a_reward_model_learns_to_rank_its_pairs_and_scores_them_from_disk(tmp_path: Path, capsys) -> None:
    """Full training of a reward model from the demo model: the loss starts at log 2 (a fresh head scores every
    answer alike) and falls; `llamaforge score` reads the saved folder and ranks the training pairs' chosen first."""
    import math

    from llamaforge.cli import main
    from llamaforge.finetune.config import TrainConfig
    from llamaforge.finetune.progress import read_metrics
    from llamaforge.finetune.trainer import finetune

    train = arithmetic_pairs(tmp_path / "train.jsonl", 48)
    finetune(TrainConfig(data=str(train), out=str(tmp_path / "rm"), objective="reward", method="full",
                         max_steps=30, batch_size=8, lr=1e-4, seq_len=64, val_fraction=0.0, save_every=0))
    records = [r for r in read_metrics(tmp_path / "rm" / "metrics.jsonl") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=0.02)
    last = records[-5:]
    assert sum(r["loss"] for r in last) / 5 < 0.5 and sum(r["accuracy"] for r in last) / 5 >= 0.8
    capsys.readouterr()  # the run's progress lines
    assert main(["score", "--reward-model", str(tmp_path / "rm" / "model"), "--data", str(train), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(lines[-1])
    assert summary["pairs"] == 48 and summary["accuracy"] >= 0.9 and summary["mean_margin"] > 0
    assert json.loads(lines[0])["where"] == "line 1"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_lora_reward_model_is_a_peft_adapter_with_the_same_rewards(tmp_path: Path, method: str, capsys) -> None:
    """LoRA (and QLoRA) reward training on the demo model: the loss falls; the folder is a peft SEQ_CLS adapter with
    the head as `score.weight`, which transformers' LlamaForSequenceClassification of the base plus peft load with
    the rewards llamaforge reads from it (LoRA; a QLoRA base is 4-bit, so only its own rewards are compared);
    `llamaforge score` takes the folder."""
    import llamaforge
    from llamaforge.cli import main
    from llamaforge.finetune.config import TrainConfig
    from llamaforge.finetune.progress import read_metrics
    from llamaforge.finetune.trainer import finetune

    train = arithmetic_pairs(tmp_path / "train.jsonl", 24)
    out = tmp_path / "rm"
    finetune(TrainConfig(data=str(train), out=str(out), objective="reward", method=method, max_steps=12,
                         batch_size=8, lr=2e-3, seq_len=64, val_fraction=0.0, save_every=0, lora_dropout=0.0))
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["task_type"] == "SEQ_CLS" and settings["modules_to_save"] == ["score"]
    model, tokenizer = load_reward_model(out)
    probe = torch.randint(3, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        ours = sequence_rewards(model, probe, torch.tensor([17, 17, 17]))
    assert ours.std() > 0  # the head reads the sequence, not a constant
    if method == "lora":
        transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
        demo = Path(llamaforge.__file__).parent / "data" / "demo"
        base = transformers.LlamaForSequenceClassification.from_pretrained(demo, num_labels=1, pad_token_id=PAD_ID,
                                                                           dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, out).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(probe).logits[:, 0], ours, atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    assert main(["score", "--reward-model", str(out), "--data", str(train), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["pairs"] == 24 and summary["accuracy"] > 0.5


def test_an_adapter_that_is_no_reward_model_is_named(tmp_path: Path) -> None:
    from factories import random_model

    from llamaforge.config import ModelArgs
    from llamaforge.lora import LoraConfig, add_lora, save_adapter

    model = add_lora(random_model(ModelArgs(**CONFIG)), LoraConfig(r=2))
    save_adapter(model, tmp_path / "chat", base_model="demo")
    with pytest.raises(RewardModelError, match="is an adapter of task 'CAUSAL_LM', not a reward model's"):
        load_reward_model(tmp_path / "chat")


def test_a_chat_model_is_not_a_reward_model_nor_the_reverse(tiny_model_dir: Path, reward_dir: Path) -> None:
    import llamaforge
    from llamaforge.errors import CheckpointError

    with pytest.raises(RewardModelError, match="is not a reward model"):
        load_reward_model(tiny_model_dir)
    with pytest.raises(CheckpointError, match=r"holds a reward model .*`llamaforge score --reward-model`"):
        llamaforge.load(reward_dir)


def test_sample_keeps_the_answer_a_reward_model_scores_highest(reward_dir: Path, tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    """A reward model as rejection sampling's reward: each kept answer is the best of its n by that model."""
    import llamaforge
    from llamaforge.cli import main
    from llamaforge.engine import Engine
    from llamaforge.finetune.rejection import generate_all
    from llamaforge.finetune.reward import RewardModelScorer
    from llamaforge.sampling import SamplingParams

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Story {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "best.jsonl"
    # The tiny model samples; a random reward model with its vocabulary scores.
    assert main(["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "3", "--reward-model",
                 str(reward_dir), "--out", str(out), "--max-new-tokens", "6", "--temperature", "1.0"]) == 0
    scorer, best = RewardModelScorer(reward_dir), [json.loads(line) for line in out.read_text().splitlines()]
    llm = llamaforge.load(tiny_model_dir)
    engine = Engine(llm, max_batch_size=4).start()
    try:
        answers = generate_all(engine, [llm.chat_tokens([{"role": "user", "content": f"Story {i}"}])
                                        for i in range(3)], 3, SamplingParams(max_new_tokens=6, temperature=1.0), 0)
    finally:
        engine.stop()
    for record, candidates in zip(best, answers, strict=True):
        texts = [llm.tokenizer.decode(ids).strip() for ids in candidates]
        scores = [scorer(record["messages"][:-1], text) for text in texts]
        assert record["reward"] == pytest.approx(max(scores), abs=1e-6)
        assert record["messages"][-1]["content"] == texts[scores.index(max(scores))]
