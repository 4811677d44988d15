"""Fine-tuning end to end on a tiny model: it learns, it stops, it resumes exactly, it scales out exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import ServeCommand, random_model, write_hf_dir

import llamaforge
from llamaforge.config import ModelArgs
from llamaforge.finetune.config import TrainConfig, TrainingError
from llamaforge.finetune.progress import read_metrics
from llamaforge.finetune.trainer import finetune

COLORS = ["red", "blue", "green", "yellow", "black"]
ANIMALS = ["llama", "fox", "dog", "cat", "owl", "bee", "cow", "hen", "yak", "elk"]
QA = [{"instruction": f"What color is the {a} number {i}?",
       "response": f"The {a} {i} is {COLORS[(i * 3 + len(a)) % 5]}."} for a in ANIMALS for i in range(5)]
CONFIG = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=128, max_seq_len=128)
FAST = {"seq_len": 128, "pack": True, "batch_size": 8, "val_fraction": 0.0, "warmup_ratio": 0.05, "save_every": 0,
        "lora_r": 8, "lora_alpha": 32.0, "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in QA) + "\n")
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_path: Path) -> Path:
    """A random base model whose output head is large enough for an adapter to make peaked predictions."""
    return write_hf_dir(tmp_path_factory.mktemp("base") / "model", random_model(CONFIG, std=0.2), tiny_tokenizer_path)


def answers(llm, rows: list[dict]) -> list[tuple[str, str]]:
    """(answer text, finish reason) of greedy chat answers to the rows' questions."""
    outs = [llm.chat([{"role": "user", "content": row["instruction"]}], temperature=0, max_new_tokens=40)
            for row in rows]
    return [(out.text.strip(), out.finish_reason) for out in outs]


def cli(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.Popen([sys.executable, "-m", "llamaforge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def losses(out: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(out / "metrics.jsonl") if "loss" in record]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_learns_the_answers_and_stops(method: str, qa_file: Path, base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / method
    result = finetune(TrainConfig(data=str(qa_file), out=str(out), model=str(base_dir), method=method, lr=1e-2,
                                  max_steps=150, **FAST))
    assert result.train_losses[-1] < result.train_losses[0] / 50
    llm = llamaforge.load(base_dir, adapter=out)  # a QLoRA adapter goes back on its 4-bit base (its manifest)
    got = answers(llm, QA[::3])
    assert all(reason == "stop" for _, reason in got)  # every answer ends with EOS
    assert sum(text == row["response"] for (text, _), row in zip(got, QA[::3], strict=True)) >= len(got) - 1
    assert answers(llamaforge.load(base_dir), QA[:1])[0][0] != QA[0]["response"]
    manifest = json.loads((out / "llamaforge_manifest.json").read_text())
    assert manifest["method"] == method and manifest["steps"] == 150 and manifest["base_model"] == str(base_dir)
    assert len(manifest["data"]["sha256"]) == 64 and manifest["final_train_loss"] == result.train_losses[-1]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_training_on_cuda_in_bf16(method: str, qa_file: Path, base_dir: Path, tmp_path: Path) -> None:
    """On a GPU: bf16 autocast, a bf16 (or NF4) base on the device, fused AdamW; the model still learns and stops."""
    out = tmp_path / method
    result = finetune(TrainConfig(data=str(qa_file), out=str(out), model=str(base_dir), method=method, lr=1e-2,
                                  max_steps=150, device="cuda", **FAST))
    assert result.train_losses[-1] < result.train_losses[0] / 20
    llm = llamaforge.load(base_dir, adapter=out, device="cuda", dtype="bf16")
    got = answers(llm, QA[::3])
    assert all(reason == "stop" for _, reason in got)
    assert sum(text == row["response"] for (text, _), row in zip(got, QA[::3], strict=True)) >= len(got) - 2


@pytest.mark.slow
def test_full_finetune_writes_a_model_transformers_loads(qa_file: Path, base_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "full"
    config = TrainConfig(data=str(qa_file), out=str(out), model=str(base_dir), method="full", lr=3e-3,
                         max_steps=120, eval_every=40, **(FAST | {"val_fraction": 0.1}))
    result = finetune(config)
    assert result.train_losses[-1] < result.train_losses[0] / 20
    val = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val] == [40, 80, 120] and val[-1]["val_loss"] == pytest.approx(result.val_loss)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    tuned = llamaforge.load(out / "model")
    train_rows = [row for row in QA if row["instruction"] in {r["instruction"] for r in QA[::9]}]
    assert sum(a == (row["response"], "stop") for a, row in zip(answers(tuned, train_rows), train_rows,
                                                                  strict=True)) >= len(train_rows) - 1
    hf = transformers.LlamaForCausalLM.from_pretrained(out / "model").eval()
    from llamaforge.chat import JINJA_TEMPLATE  # transformers' apply_chat_template formats chats for the model

    assert json.loads((out / "model" / "tokenizer_config.json").read_text())["chat_template"] == JINJA_TEMPLATE
    probe = torch.randint(0, CONFIG.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(probe).logits, tuned.model(probe), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_merge_equals_base_plus_adapter(qa_file: Path, base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "qlora"
    finetune(TrainConfig(data=str(qa_file), out=str(out), model=str(base_dir), method="qlora", lr=1e-2,
                         max_steps=10, **FAST))
    merged_dir = tmp_path / "merged"
    process = cli("merge", "--model", str(base_dir), "--adapter", str(out), "--out", str(merged_dir))
    assert process.wait(timeout=120) == 0, process.stderr.read()
    umask = os.umask(0)
    os.umask(umask)
    assert {file.stat().st_mode & 0o777 for file in merged_dir.iterdir()} == {0o666 & ~umask}  # not owner-only
    merged = llamaforge.load(merged_dir)
    unmerged = llamaforge.load(base_dir, adapter=out, merge_adapter=False)
    probe = torch.randint(0, CONFIG.vocab_size, (2, 30))
    with torch.no_grad():
        # Merging rounds W + BA once in float32; through this model's large random activations (logits ~ +-30)
        # that moves a logit by up to ~2e-5.
        torch.testing.assert_close(merged.model(probe), unmerged.model(probe), atol=1e-4, rtol=0)
        assert (merged.model(probe) - llamaforge.load(base_dir).model(probe)).abs().max() > 1e-3


@pytest.mark.slow
def test_pretrain_from_scratch_with_init(tmp_path: Path, tiny_tokenizer_path: Path) -> None:
    from factories import CORPUS

    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": line}) for line in CORPUS[:6]))
    result = finetune(TrainConfig(data=str(data), out=str(tmp_path / "out"), init="tiny",
                                  tokenizer=str(tiny_tokenizer_path), method="full", lr=3e-3, max_steps=60,
                                  seq_len=256, pack=True, batch_size=2, val_fraction=0.0, save_every=0))
    assert result.train_losses[-1] < result.train_losses[0] / 5
    llm = llamaforge.load(tmp_path / "out" / "model")
    assert llm.config.dim == 64 and llm.config.vocab_size == 400  # the preset's shape, the tokenizer's vocabulary
    out = llm.generate("Llamas live in", temperature=0, max_new_tokens=12)
    assert out.text.startswith(" the Andes")


def test_accumulation_equals_one_big_batch(qa_file: Path, base_dir: Path, tmp_path: Path) -> None:
    runs = []
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        out = tmp_path / f"b{batch_size}"
        settings = FAST | {"batch_size": batch_size, "grad_accum": grad_accum}
        runs.append(finetune(TrainConfig(data=str(qa_file), out=str(out), model=str(base_dir), method="full",
                                         lr=3e-3, max_steps=5, **settings)).train_losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-5, abs=1e-6)


def run_to_end(args: list[str]) -> None:
    process = cli(*args)
    assert process.wait(timeout=300) == 0, process.stderr.read()


def wait_for_step(out: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if any(r.get("step", 0) >= step for r in read_metrics(out / "metrics.jsonl") if "loss" in r):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}: {process.stderr.read() if process.poll() else ''}")


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(qa_file: Path, base_dir: Path, tmp_path: Path) -> None:
    """Dropout and a cosine schedule make this strict: RNG, optimizer, scheduler and data position must all resume."""
    def args(out: Path) -> list[str]:
        return ["finetune", "--model", str(base_dir), "--data", str(qa_file), "--out", str(out), "--method", "lora",
                "--max-steps", "24", "--save-every", "5", "--batch-size", "4", "--seq-len", "128", "--lr", "1e-2",
                "--lora-dropout", "0.1", "--val-fraction", "0.1"]

    run_to_end(args(tmp_path / "straight"))
    process = cli(*args(tmp_path / "killed"))
    wait_for_step(tmp_path / "killed", 13, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())[-1] >= "step-00000010"
    run_to_end(args(tmp_path / "killed") + ["--resume"])
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 24
    for name in ("adapter_model.safetensors",):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(sig: int, qa_file: Path, base_dir: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["finetune", "--model", str(base_dir), "--data", str(qa_file), "--out", str(out), "--method", "full",
            "--max-steps", "5000", "--save-every", "0", "--batch-size", "2", "--seq-len", "128", "--lr", "1e-3"]
    process = cli(*args)  # 5000 steps: the interrupt must land mid-run even when the test is slow to send it
    wait_for_step(out, 3, process)
    process.send_signal(sig)
    assert process.wait(timeout=60) == 130
    stdout = process.stdout.read()
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and f"checkpoint saved in {saved[0]}" in stdout
    step = int(saved[0].name.split("-")[1])
    # The step the signal landed in is finished and logged, and the checkpoint is exactly that step.
    assert len(losses(out)) == step >= 3
    resumed = cli(*args[:10], "60", *args[11:], "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert f"resumed from {saved[0]} at step {step}" in resumed.stdout.read()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == list(range(1, 61))


@pytest.mark.slow
def test_fsdp_two_processes_match_one(qa_file: Path, base_dir: Path, tmp_path: Path) -> None:
    """torchrun, gloo on CPU: 2 ranks x batch 2 against 1 process x batch 4 (the same global batch)."""
    common = ["--model", str(base_dir), "--data", str(qa_file), "--method", "full", "--max-steps", "6",
              "--seq-len", "128", "--lr", "3e-3", "--val-fraction", "0.1", "--save-every", "3"]
    run_to_end(["finetune", "--out", str(tmp_path / "one"), "--batch-size", "4", *common])
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "llamaforge", "finetune",
                              "--out", str(tmp_path / "two"), "--batch-size", "2", *common],
                             capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    # Same data, same global batch; only the order of float additions differs (sums over ranks).
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one = llamaforge.load(tmp_path / "one" / "model").model.state_dict()
    two = llamaforge.load(tmp_path / "two" / "model").model.state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)


def test_nan_loss_stops_and_names_the_step(qa_file: Path, tiny_tokenizer_path: Path, tmp_path: Path) -> None:
    """A base with one non-finite weight (as a broken download or fp16 overflow leaves) makes the loss NaN."""
    broken = random_model(CONFIG, std=0.2)
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    base = write_hf_dir(tmp_path / "broken", broken, tiny_tokenizer_path)
    process = cli("finetune", "--model", str(base), "--data", str(qa_file), "--out", str(tmp_path / "nan"),
                  "--method", "lora", "--max-steps", "5", "--seq-len", "128")
    assert process.wait(timeout=120) == 2
    error = process.stderr.read().strip().splitlines()[-1]
    assert error.startswith("error: the loss became nan") and "at step 1;" in error and "Lower --lr" in error
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()


def test_run_settings_are_checked(qa_file: Path, base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="--init needs --tokenizer"):
        TrainConfig(data="d", out="o", init="tiny", method="full")
    with pytest.raises(TrainingError, match="exactly one of --model"):
        TrainConfig(data="d", out="o", model="m", init="tiny", tokenizer="t", method="full")
    assert TrainConfig(data="d", out="o").model == "demo"  # no --model: fine-tune the built-in demo model
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        finetune(TrainConfig(data=str(qa_file), out=str(tmp_path / "none"), model=str(base_dir), resume=True))
    out = tmp_path / "run"
    every_step = FAST | {"save_every": 1}
    finetune(TrainConfig(data=str(qa_file), out=str(out), model=str(base_dir), max_steps=2, **every_step))
    with pytest.raises(TrainingError, match="already holds files; pass --resume"):
        finetune(TrainConfig(data=str(qa_file), out=str(out), model=str(base_dir), max_steps=2, **FAST))
    with pytest.raises(TrainingError, match=r"settings differ .* lr: auto -> 0.001"):
        finetune(TrainConfig(data=str(qa_file), out=str(out), model=str(base_dir), max_steps=4, lr=1e-3, resume=True,
                             **(FAST | {"save_every": 1})))


@pytest.fixture(scope="module")
def trained_adapter(qa_file: Path, base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "lora"
    finetune(TrainConfig(data=str(qa_file), out=str(out), model=str(base_dir), method="lora", lr=1e-2,
                         max_steps=120, **FAST))
    return out


@pytest.mark.slow
def test_generate_and_serve_take_the_adapter(trained_adapter: Path, base_dir: Path) -> None:
    openai = pytest.importorskip("openai")
    question = [{"role": "user", "content": QA[4]["instruction"]}]
    expected = llamaforge.load(base_dir, adapter=trained_adapter).chat(question, temperature=0, max_new_tokens=30)
    generate = cli("chat", "--model", str(base_dir), "--adapter", str(trained_adapter), "--temperature", "0",
                   "--max-new-tokens", "30", "--json", stdin=subprocess.PIPE)
    stdout, stderr = generate.communicate(QA[4]["instruction"] + "\n", timeout=120)
    answer = next(json.loads(line) for line in stdout.splitlines() if line.startswith("{"))
    assert answer["text"] == expected.text and expected.text.strip() == QA[4]["response"], stderr
    with ServeCommand("--model", str(base_dir), "--adapter", str(trained_adapter)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        reply = client.chat.completions.create(model="any", messages=question, temperature=0, max_tokens=30)
        assert reply.choices[0].message.content == expected.text
        assert reply.choices[0].finish_reason == "stop"


def test_trained_adapter_loads_in_peft(trained_adapter: Path, base_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    tuned = peft.PeftModel.from_pretrained(hf, trained_adapter).eval()
    ours = llamaforge.load(base_dir, adapter=trained_adapter, merge_adapter=False)
    probe = torch.randint(0, CONFIG.vocab_size, (2, 25))
    with torch.no_grad():
        torch.testing.assert_close(tuned(probe).logits, ours.model(probe), atol=1e-5, rtol=0)


def test_data_check_command(qa_file: Path, tiny_tokenizer_path: Path, tmp_path: Path) -> None:
    clean = cli("data", "check", str(qa_file), "--tokenizer", str(tiny_tokenizer_path), "--seq-len", "40")
    stdout, _ = clean.communicate(timeout=60)
    assert clean.returncode == 0
    assert "records: 50" in stdout and "schemas: dolly 50" in stdout and "result: OK" in stdout
    assert f"[[ {QA[0]['response']} </s>]]" in stdout  # the loss mask of the first example
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QA[0]) + "\n" + json.dumps({"instruction": "no answer"}) + "\n")
    broken = cli("data", "check", str(bad), "--tokenizer", str(tiny_tokenizer_path), "--json")
    stdout, _ = broken.communicate(timeout=60)
    assert broken.returncode == 1
    report = json.loads(stdout)
    assert report["problems"] == [{"where": "line 2", "message": report["problems"][0]["message"]}]
    assert "missing field 'response'" in report["problems"][0]["message"]
