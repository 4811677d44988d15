"""Preference pairs and the DPO / IPO / robust losses: every layout trl reads, errors by line, and trl 1.x's
DPOTrainer's tokens, loss, rewards and gradients at step 0."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llamaforge.finetune.data import DataError, Record
from llamaforge.finetune.preference import (
    PreferencePair,
    answer_logps,
    encode_pair,
    pair_batch,
    preference_loss,
    to_pair,
)

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
PAIRS = [
    {"prompt": QUESTION, "chosen": [{"role": "assistant", "content": "2 + 3 = 5."}],
     "rejected": [{"role": "assistant", "content": "2 + 3 = 6."}]},
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}],
     "chosen": [{"role": "assistant", "content": "Red."}],
     "rejected": [{"role": "assistant", "content": "I would rather not say which color I like."}]},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How many legs has a llama?"}],
     "chosen": [{"role": "assistant", "content": "Four."}], "rejected": [{"role": "assistant", "content": "Two."}]},
]


def test_every_layout_gives_the_same_pair() -> None:
    expected = PreferencePair(QUESTION, "2 + 3 = 5.", "2 + 3 = 6.")
    layouts = [
        {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."},  # standard
        PAIRS[0],  # conversational
        {"chosen": [*QUESTION, {"role": "assistant", "content": "2 + 3 = 5."}],  # implicit prompt
         "rejected": [*QUESTION, {"role": "assistant", "content": "2 + 3 = 6."}]},
        {"chosen": "\n\nHuman: What is 2 + 3?\n\nAssistant: 2 + 3 = 5.",  # HH-RLHF
         "rejected": "\n\nHuman: What is 2 + 3?\n\nAssistant: 2 + 3 = 6."},
    ]
    assert [to_pair(Record(f"line {i}", layout)) for i, layout in enumerate(layouts, start=1)] == [expected] * 4
    hh = to_pair(Record("row 1", {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Legs?\n\nAssistant: Four.",
                                  "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Legs?\n\nAssistant: Two"}))
    assert hh.prompt[-1] == {"role": "user", "content": "Legs?"} and len(hh.prompt) == 3
    assert (hh.chosen, hh.rejected) == ("Four.", "Two")


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Hi", "chosen": "  ", "rejected": "Bye"}, "line 7: chosen is empty"),
    ({"prompt": "Hi", "chosen": "Same", "rejected": "Same "}, "line 7: chosen and rejected are the same answer"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "a",
      "rejected": "b"}, "line 7: the prompt must end with a user turn"),
    ({"prompt": "Hi", "chosen": "a"}, "line 7: a preference pair needs 'chosen' and 'rejected'"),
    ({"chosen": [*QUESTION, {"role": "assistant", "content": "5"}],
      "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "6"}]},
     "line 7: .*differ before it"),
    ({"chosen": "just text", "rejected": "more text"}, "line 7: 'chosen' is neither a dialog nor HH-RLHF text"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "line 7: 'chosen' must be a string or a list holding one assistant message"),
])
def test_bad_pairs_are_refused_by_line(record: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        to_pair(Record("line 7", record))


def test_an_answer_is_encoded_after_its_prompt_as_a_supervised_example_is(tiny_llm) -> None:
    from llamaforge.chat import encode_dialog
    from llamaforge.finetune.data import encode_chat

    pair = to_pair(Record("line 1", PAIRS[2]))
    encoded = encode_pair(tiny_llm.tokenizer, pair)
    full = encode_chat(tiny_llm.tokenizer, [*pair.prompt, {"role": "assistant", "content": pair.chosen}])
    assert encoded.prompt_ids + encoded.chosen_ids == full.input_ids
    assert encoded.prompt_ids == encode_dialog(tiny_llm.tokenizer, pair.prompt)  # what generation would feed
    assert encoded.chosen_ids[-1] == encoded.rejected_ids[-1] == tiny_llm.tokenizer.eos_id
    batch = pair_batch([encoded, encoded])
    assert batch["input_ids"].shape[0] == 4 and batch["completion_mask"][0].sum() == len(encoded.chosen_ids)


def test_losses_follow_their_formulas() -> None:
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -5.0]), torch.tensor([-3.0, -4.0])
    beta, smoothing = 0.5, 0.2
    delta = torch.tensor([(-3.0 + 3.5) - (-4.0 + 3.0), (-5.0 + 5.0) - (-4.5 + 4.0)])
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    cdpo = [-(1 - smoothing) * math.log(sigmoid(beta * d)) - smoothing * math.log(sigmoid(-beta * d)) for d in delta]
    loss, metrics = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta, "sigmoid", smoothing)
    assert loss.item() == pytest.approx(sum(cdpo) / 2, rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(beta * (0.5 + 0.0) / 2)
    assert metrics["rewards/accuracies"] == 1.0 and metrics["rewards/margins"] == pytest.approx(beta * delta.mean())
    loss, _ = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta, "ipo",
                              chosen_tokens=torch.tensor([2, 4]), rejected_tokens=torch.tensor([1, 5]))
    ipo = [((0.5 / 2 - (-1.0) / 1) - 1 / (2 * beta)) ** 2, ((0.0 / 4 - (-0.5) / 5) - 1 / (2 * beta)) ** 2]
    assert loss.item() == pytest.approx(sum(ipo) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="label smoothing must be in"):
        preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta, "robust", 0.5)
    with pytest.raises(ValueError, match="loss type 'kto' is not one of"):
        preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta, "kto")


@pytest.mark.slow
@pytest.mark.parametrize(("loss_type", "smoothing", "rpo_alpha"),
                         [("sigmoid", 0.0, 0.0), ("ipo", 0.0, 0.0), ("robust", 0.1, 0.0), ("sigmoid", 0.0, 0.7)])
def test_step_zero_equals_trl_dpo_trainer(tmp_path: Path, tiny_tokenizer_path: Path, loss_type: str,
                                          smoothing: float, rpo_alpha: float) -> None:
    """The same tiny weights (a policy and a different reference) and pairs through trl 1.x's DPOTrainer and through
    llamaforge: the same tokens, loss, rewards and policy gradients (1e-5). rpo_alpha: trl's loss_type
    ["sigmoid", "sft"] weighted [1, rpo_alpha]."""
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    from factories import random_model

    import llamaforge
    from llamaforge.chat import JINJA_TEMPLATE
    from llamaforge.checkpoint.hf import save_hf_dir
    from llamaforge.config import ModelArgs
    from llamaforge.tokenizer import Tokenizer

    config = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=128, max_seq_len=128)
    tokenizer = Tokenizer(tiny_tokenizer_path)
    folders = {name: save_hf_dir(random_model(config, seed=seed).state_dict(), config, tmp_path / name, tokenizer,
                                 chat_template=JINJA_TEMPLATE) for name, seed in (("policy", 1), ("reference", 2))}

    # trl: its own tokenization of the conversational pairs, its loss and metrics, then backward.
    policy = transformers.AutoModelForCausalLM.from_pretrained(folders["policy"], dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folders["reference"], dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folders["policy"])
    hf_tokenizer.pad_token = hf_tokenizer.unk_token
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), beta=0.5,
                         loss_type=[loss_type, "sft"] if rpo_alpha else [loss_type],
                         loss_weights=[1.0, rpo_alpha] if rpo_alpha else None, label_smoothing=smoothing,
                         report_to=[], use_cpu=True, bf16=False,
                         max_length=None, precompute_ref_log_probs=False, dataset_num_proc=None, seed=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=hf_tokenizer,
                             train_dataset=datasets.Dataset.from_list(PAIRS))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    theirs = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    tokenized = {tuple(row["prompt_ids"]): row for row in trainer.train_dataset}

    # llamaforge: the same pairs and weights.
    ours_policy = llamaforge.load(folders["policy"], dtype="float32").model.train()
    ours_reference = llamaforge.load(folders["reference"], dtype="float32").model.eval()
    encoded = [encode_pair(tokenizer, to_pair(Record(f"row {i}", pair))) for i, pair in enumerate(PAIRS, start=1)]
    for pair in encoded:  # trl's tokens
        row = tokenized[tuple(pair.prompt_ids)]
        assert (row["chosen_ids"], row["rejected_ids"]) == (pair.chosen_ids, pair.rejected_ids)
    inputs = pair_batch(encoded)
    logps = answer_logps(ours_policy, inputs["input_ids"], inputs["completion_mask"])
    with torch.no_grad():
        ref = answer_logps(ours_reference, inputs["input_ids"], inputs["completion_mask"])
    tokens = inputs["completion_mask"].sum(dim=1)
    ours_loss, ours_metrics = preference_loss(*logps.chunk(2), *ref.chunk(2), beta=0.5, loss_type=loss_type,
                                              label_smoothing=smoothing, chosen_tokens=tokens[:len(PAIRS)],
                                              rejected_tokens=tokens[len(PAIRS):], rpo_alpha=rpo_alpha)
    ours_loss.backward()
    assert ours_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert ours_metrics[name] == pytest.approx(metrics[name], abs=1e-5), name
    grads = {name: p.grad for name, p in ours_policy.named_parameters() if p.grad is not None}
    assert set(grads) == set(theirs)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def arithmetic_pairs(path: Path, count: int) -> Path:
    """Preference pairs from the demo model's own skill: the right sum chosen over a sum one off."""
    import json

    lines = []
    for i in range(count):
        a, b = 3 + 7 * i % 40, 11 + 5 * i % 30
        lines.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} + {b} = {a + b}.",
                      "rejected": f"{a} + {b} = {a + b + 1 + i % 3}."})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.slow
def test_dpo_on_the_demo_model_widens_the_margin_and_resumes_exactly(tmp_path: Path) -> None:
    """LoRA DPO on the demo model: the first step's loss is log 2 (the policy is the reference), the reward
    margin and accuracy grow, held-out pairs' loss falls below log 2; a run resumed from its step-4 checkpoint gives
    the uninterrupted run's losses and metrics; the adapter loads here and in HF peft with the same logits."""
    import shutil

    import llamaforge
    from llamaforge.finetune.config import TrainConfig
    from llamaforge.finetune.progress import read_metrics
    from llamaforge.finetune.trainer import finetune

    data = arithmetic_pairs(tmp_path / "pairs.jsonl", 24)
    settings = {"data": str(data), "objective": "dpo", "beta": 0.5, "max_steps": 8, "batch_size": 4,
                "val_fraction": 0.25, "seq_len": 128, "lr": 1e-3, "save_every": 4}
    result = finetune(TrainConfig(out=str(tmp_path / "straight"), **settings))
    records = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"] + 0.1
    assert records[-1]["rewards/accuracies"] > 0.5 and records[-1]["loss"] < records[0]["loss"]
    assert result.val_loss < math.log(2)
    held_out = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "val_loss" in r]
    assert len(held_out) == 1 and held_out[0]["val_loss"] == result.val_loss  # the held-out pairs' metrics too
    assert held_out[0]["val_rewards/margins"] > 0.1 and held_out[0]["val_rewards/accuracies"] > 0.5
    assert (tmp_path / "straight" / "loss.png").stat().st_size > 0
    resumed_out = shutil.copytree(tmp_path / "straight", tmp_path / "resumed")  # as if killed after step 4's save
    shutil.rmtree(resumed_out / "checkpoints" / "step-00000008")
    finetune(TrainConfig(out=str(resumed_out), resume=True, **settings))
    resumed = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in records]
    llm = llamaforge.load(adapter=tmp_path / "straight")
    assert llm.chat([{"role": "user", "content": "What is 3 plus 11?"}], temperature=0.0, max_new_tokens=12).text
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    demo = Path(llamaforge.__file__).parent / "data" / "demo"
    hf = transformers.LlamaForCausalLM.from_pretrained(demo, dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "straight").eval()  # the DPO adapter is a peft adapter
    ours = llamaforge.load(adapter=tmp_path / "straight", dtype="float32", merge_adapter=False)
    probe = torch.randint(3, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(tuned(probe).logits, ours.model(probe), atol=1e-4, rtol=0)


def test_data_check_reports_pairs_and_their_problems_by_line(tmp_path: Path, tiny_llm) -> None:
    import json

    from llamaforge.finetune.inspect import check_data

    rows = [PAIRS[0], {"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, PAIRS[1],
            {"prompt": "Hi", "chosen": "", "rejected": "Bye"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = check_data(str(path), tiny_llm.tokenizer, seq_len=2048)
    assert report.schemas == {"preference": 4} and not report.ok
    assert [(p.where, p.message) for p in report.problems] == [
        ("line 2", "chosen and rejected are the same answer; the pair teaches nothing"), ("line 4", "chosen is empty")]
    first = encode_pair(tiny_llm.tokenizer, to_pair(Record("line 1", PAIRS[0])))
    assert report.sizes[0].tokens == len(first.prompt_ids) + max(len(first.chosen_ids), len(first.rejected_ids))
    assert report.sizes[0].labelled == len(first.chosen_ids) + len(first.rejected_ids)
    text = report.first_example.text  # loss on the chosen answer and its EOS only
    assert text.startswith("<s>[INST] What is 2 + 3? [/INST][[ 2 + 3 = 5.") and text.endswith("</s>]]")
    assert text.count("[[") == 1


@pytest.mark.slow
def test_dpo_under_fsdp_on_two_processes_matches_one(tmp_path: Path) -> None:
    """torchrun, gloo on CPU, full DPO (with RPO's NLL term, whose answers differ in length between the ranks) on the
    demo model: 2 ranks x 2 pairs against 1 process x 4 pairs."""
    import os
    import shutil
    import subprocess
    import sys

    from llamaforge.finetune.progress import read_metrics

    data = arithmetic_pairs(tmp_path / "pairs.jsonl", 16)
    common = ["--data", str(data), "--objective", "dpo", "--method", "full", "--max-steps", "4", "--lr", "1e-4",
              "--beta", "0.5", "--seq-len", "64", "--val-fraction", "0", "--save-every", "0", "--rpo-alpha", "0.5"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "llamaforge", "finetune", "--out", str(tmp_path / "one"),
                          "--batch-size", "4", *common], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "llamaforge", "finetune",
                          "--out", str(tmp_path / "two"), "--batch-size", "2", *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    keys = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen")
    records = {name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
               for name in ("one", "two")}
    assert len(records["one"]) == 4
    for a, b in zip(records["one"], records["two"], strict=True):
        assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-4, abs=1e-6)


def test_a_steps_loss_does_not_depend_on_its_micro_batches(tmp_path: Path) -> None:
    """DPO with RPO's NLL term (a mean over the step's chosen tokens, not each micro-batch's), no dropout, fp32:
    4 pairs at once and 4 micro-batches of 1 give the same losses and metrics, and the NLL term is in the loss."""
    from llamaforge.finetune.config import TrainConfig
    from llamaforge.finetune.progress import read_metrics
    from llamaforge.finetune.trainer import finetune

    data = arithmetic_pairs(tmp_path / "pairs.jsonl", 8)
    common = {"data": str(data), "objective": "dpo", "max_steps": 2, "seq_len": 64, "save_every": 0,
              "val_fraction": 0.0, "lr": 1e-3, "lora_dropout": 0.0, "precision": "fp32"}
    runs = {}
    for name, batch, accum, alpha in (("whole", 4, 1, 1.0), ("split", 1, 4, 1.0), ("plain", 4, 1, 0.0)):
        finetune(TrainConfig(out=str(tmp_path / name), batch_size=batch, grad_accum=accum, rpo_alpha=alpha, **common))
        runs[name] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    keys = ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss")
    values = {name: [r[k] for r in runs[name] for k in keys] for name in ("whole", "split")}
    assert values["split"] == pytest.approx(values["whole"], rel=1e-5, abs=1e-6)
    first = runs["whole"][0]  # at step 0 the DPO part is log 2 and the NLL is the chosen answers' per token
    assert first["loss"] == pytest.approx(math.log(2) + first["nll_loss"], abs=1e-5)
    assert runs["plain"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and "nll_loss" not in runs["plain"][0]


def test_qlora_dpo_runs_on_the_cpu(tmp_path: Path) -> None:
    from llamaforge.finetune.config import TrainConfig
    from llamaforge.finetune.trainer import finetune

    data = arithmetic_pairs(tmp_path / "pairs.jsonl", 8)
    result = finetune(TrainConfig(data=str(data), out=str(tmp_path / "out"), objective="dpo", method="qlora",
                                  loss_type="ipo", max_steps=2, batch_size=4, seq_len=64, save_every=0))
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.train_losses)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
