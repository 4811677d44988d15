"""Evaluation without lm-eval: prompt templates, KV-cache reuse, task files, metrics, perplexity, CLI and errors.

Parity with lm-evaluation-harness itself is in test_eval_parity.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factories import CORPUS, write_eval_data, write_eval_model

import llamaforge
from llamaforge.cli import main
from llamaforge.eval.data import DataSource, EvalDataError, read_rows
from llamaforge.eval.evaluator import evaluate, prepare
from llamaforge.eval.fewshot import fewshot_prefix
from llamaforge.eval.metrics import gsm8k_scores, mc2
from llamaforge.eval.perplexity import perplexity
from llamaforge.eval.report import markdown
from llamaforge.eval.scoring import Scored, loglikelihoods, tokenize_request
from llamaforge.eval.tasks import MMLU_CATEGORY, MMLU_SUBJECTS, make_task


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eval_data(tmp_path_factory.mktemp("eval-data"), n_eval=3, subjects=tuple(MMLU_CATEGORY))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_path: Path) -> Path:
    return write_eval_model(tmp_path_factory.mktemp("eval-model") / "model", tiny_tokenizer_path)


@pytest.fixture(scope="module")
def llm(model_dir: Path):
    return llamaforge.load(model_dir)


def test_each_task_builds_lm_evals_prompt_text() -> None:
    arc = make_task("arc_challenge")
    shot = {"question": "Why?", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"}
    doc = {"question": "Which?", "choices": {"text": ["a", "b c"], "label": ["A", "B"]}, "answerKey": "B"}
    context = "Question: Why?\nAnswer: y\n\nQuestion: Which?\nAnswer:"
    assert arc.requests(doc, fewshot_prefix(arc, [shot])) == [(context, " a"), (context, " b c")]

    hellaswag = make_task("hellaswag")
    doc = hellaswag.prepare({"activity_label": "Llamas", "ctx_a": "A llama walks.", "ctx_b": "THE LLAMA",
                             "endings": ["hums [title] loudly", "sits.  down", "[header] eats", "x"], "label": "1"})
    assert hellaswag.requests(doc, "") == [("Llamas: A llama walks. The llama", " hums. loudly"),
                                           ("Llamas: A llama walks. The llama", " sits. down"),
                                           ("Llamas: A llama walks. The llama", "  eats"),  # lm-eval keeps it
                                           ("Llamas: A llama walks. The llama", " x")]

    mmlu = make_task("mmlu_world_religions")
    doc = {"question": " What? ", "choices": ["p", "q", "r", "s"], "answer": 2}
    prefix = fewshot_prefix(mmlu, [doc])
    assert prefix == ("The following are multiple choice questions (with answers) about world religions.\n\n"
                      "What?\nA. p\nB. q\nC. r\nD. s\nAnswer: C\n\n")
    assert [c for _, c in mmlu.requests(doc, prefix)] == [" A", " B", " C", " D"]

    truthfulqa = make_task("truthfulqa_mc2")
    doc = {"question": "Is it?", "mc2_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]}}
    (context, first), _ = truthfulqa.requests(doc, "")
    assert context.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert context.endswith("were held in Barcelona, Spain.\n\nQ: Is it?\nA:") and first == " Yes."

    winogrande = make_task("winogrande")
    doc = winogrande.prepare({"sentence": "The fox hid from the dog because _ was scared.", "option1": "fox",
                              "option2": "dog", "answer": "1"})
    assert fewshot_prefix(winogrande, [doc]) == "The fox hid from the dog because fox was scared.\n\n"
    assert winogrande.requests(doc, "") == [("The fox hid from the dog because fox", " was scared."),
                                            ("The fox hid from the dog because dog", " was scared.")]

    gsm8k = make_task("gsm8k")
    doc = {"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
    assert gsm8k.prompt(doc, fewshot_prefix(gsm8k, [doc])) == ("Question: 2 + 2?\nAnswer: 2 + 2 = 4\n#### 4\n\n"
                                                             "Question: 2 + 2?\nAnswer:")


def full_sequence_loglikelihood(llm, request: Scored) -> float:
    """The reference: the whole request in one forward pass without a cache."""
    logits = llm.model(torch.tensor([request.tokens]))[0]  # (T, V)
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[request.first_scored + i, t].item() for i, t in enumerate(request.targets))


def test_shared_prefix_runs_once_and_scores_as_full_sequences(llm, data: Path) -> None:
    runs = prepare(["arc_challenge", "hellaswag", "truthfulqa_mc2", "winogrande", "mmlu_anatomy"], DataSource(data),
                   limit=2)
    tokenizer = llm.tokenizer
    groups = [[tokenize_request(tokenizer, c, x, llm.config.context_length) for c, x in requests]
              for run in runs for requests in run.requests]
    # The same prompts cut to 30 tokens: each choice's window starts elsewhere, so little or nothing is shared.
    groups += [[tokenize_request(tokenizer, c, x, 30) for c, x in requests] for requests in runs[0].requests]
    groups.append([tokenize_request(tokenizer, "A llama", " hums", 64)])
    ran = []
    hook = llm.model.model.embed_tokens.register_forward_pre_hook(lambda _, args: ran.append(args[0].numel()))
    try:
        ours = loglikelihoods(llm.model, groups, batch_size=3, progress=False)
    finally:
        hook.remove()
    with torch.inference_mode():
        expected = [[full_sequence_loglikelihood(llm, r) for r in group] for group in groups]
    for mine, theirs in zip(ours, expected, strict=True):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-5, atol=1e-4)
    full = sum(len(r.tokens) for group in groups for r in group)
    assert sum(ran) < full / 2, "each document's shared prompt should run once, not once per choice"


def test_documents_sharing_few_shot_examples_run_them_once_per_batch(llm) -> None:
    """MMLU's questions of a subject all follow the same five examples: those run once per batch, not per question."""
    examples = "".join(f"Question {i}: which llama carries the {word} loads?\nAnswer: B\n\n"
                       for i, word in enumerate(["small", "quick", "brown", "lazy", "heavy"]))
    questions = [f"Question: does the {w} llama hum {'loudly ' * n}today?\nAnswer:"
                 for n, w in enumerate(["fox", "dog", "Andes", "small", "quick", "brown", "lazy"])]
    tokenizer = llm.tokenizer
    groups = [[tokenize_request(tokenizer, examples + q, f" {c}", 2048) for c in "ABCD"] for q in questions]
    groups.append([tokenize_request(tokenizer, "A llama", " hums", 64), tokenize_request(tokenizer, "A", " dog", 64)])
    with torch.inference_mode():
        expected = [[full_sequence_loglikelihood(llm, r) for r in group] for group in groups]
    ran: list[int] = []
    for batch_size in (3, 7):  # 7: one batch of the seven questions; 3: two batches and a leftover question
        ran.clear()
        hook = llm.model.model.embed_tokens.register_forward_pre_hook(lambda _, args: ran.append(args[0].numel()))
        try:
            ours = loglikelihoods(llm.model, groups, batch_size=batch_size, progress=False)
        finally:
            hook.remove()
        for mine, theirs in zip(ours, expected, strict=True):
            torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-5, atol=1e-4)
        if batch_size == 7:
            # Each question's prompt once would be 7 x ~250 tokens; the examples once, ~240 + 7 x ~50.
            assert sum(ran) < sum(len(group[0].tokens) for group in groups) / 2, ran


def test_limit_keeps_the_prompts_of_a_full_run(data: Path) -> None:
    source = DataSource(data)
    for task in ("hellaswag", "arc_challenge", "gsm8k"):
        full, limited = prepare([task], source)[0], prepare([task], source, limit=2)[0]
        assert limited.requests == full.requests[:2] and limited.prompts == full.prompts[:2]
        assert len(limited.docs) == 2


def test_parquet_files_and_hub_shards_read_like_jsonl(data: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "arc_challenge"
    folder.mkdir()
    test_rows, train_rows = read_rows(data / "arc_challenge/test.jsonl"), read_rows(data / "arc_challenge/train.jsonl")
    pq.write_table(pa.Table.from_pylist(test_rows), folder / "test.parquet")
    for index, part in enumerate((train_rows[:10], train_rows[10:])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"train-{index:05d}-of-00002.parquet")
    assert prepare(["arc_challenge"], DataSource(tmp_path))[0].requests == \
        prepare(["arc_challenge"], DataSource(data))[0].requests


def hub_download_cache(hf_home: Path, data: Path) -> None:
    """The `datasets` cache that downloading allenai/ai2_arc (ARC-Challenge) leaves, built from local files.

    A download prepares Arrow files under HF_HOME/datasets/allenai___ai2_arc/ARC-Challenge/0.0.0/<hash>/;
    offline, `load_dataset("allenai/ai2_arc", "ARC-Challenge")` reads them back from there.
    """
    from datasets.packaged_modules.json.json import Json

    cache = hf_home / "datasets"
    files = {split: str(data / f"arc_challenge/{split}.jsonl") for split in ("train", "test")}
    Json(cache_dir=str(cache), dataset_name="ai2_arc", config_name="ARC-Challenge", data_files=files,
         hash="0123456789abcdef").download_and_prepare()
    # Local files make the folder names carry a data-files hash a hub download's do not have.
    (cache / "ai2_arc").rename(cache / "allenai___ai2_arc")
    config = next((cache / "allenai___ai2_arc").iterdir())
    config.rename(config.with_name("ARC-Challenge"))


@pytest.mark.slow
@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "hub unreachable"])
def test_without_data_dir_tasks_load_through_datasets_from_its_cache(model_dir: Path, data: Path,
                                                                    tmp_path: Path, offline: str) -> None:
    """Offline by the environment, or because the hub does not answer (no retries for ~25 s first)."""
    pytest.importorskip("datasets")
    import os
    import subprocess
    import sys

    from factories import free_port

    hub_download_cache(tmp_path / "hf", data)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")} | {"HF_HOME": str(tmp_path / "hf")}
    if offline == "HF_HUB_OFFLINE":
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    else:
        env |= {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    flags = ["--model", str(model_dir), "--limit", "2"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llamaforge", "eval", *flags, *args], capture_output=True,
                              text=True, env=env, timeout=300)

    done = run("--tasks", "arc_challenge", "--out", str(tmp_path / "hub.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(["eval", *flags, "--tasks", "arc_challenge", "--data-dir", str(data),
                 "--out", str(tmp_path / "local.json")]) == 0
    hub, local = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("hub", "local"))
    assert hub["config"]["data"] == "hub" and hub["results"] == local["results"]

    done = run("--tasks", "winogrande")  # never downloaded
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: could not load allenai/winogrande (winogrande_xl) split validation from "
                                  "the datasets cache (offline, or the hub cannot be reached) (")
    assert "offline, pass --data-dir with local files" in done.stderr and "Retrying" not in done.stderr


def test_mmlu_reports_the_size_weighted_and_the_plain_mean_of_its_subjects(llm, data: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(data / "mmlu", tmp_path / "mmlu")
    anatomy = tmp_path / "mmlu/anatomy/test.jsonl"
    anatomy.write_text(anatomy.read_text().splitlines(keepends=True)[0])  # one document, the others three
    report = evaluate(llm, prepare(["mmlu"], DataSource(tmp_path)), batch_size=16, progress=False)
    results = report["results"]
    subjects = [f"mmlu_{s}" for s in MMLU_CATEGORY]
    assert set(results) == {"mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other", *subjects}
    assert results["mmlu"]["samples"] == 3 * 56 + 1 and results["mmlu"]["num_fewshot"] == 5
    sizes = [results[s]["samples"] for s in subjects]
    accuracies = [results[s]["acc"] for s in subjects]
    weighted = sum(a * n for a, n in zip(accuracies, sizes, strict=True)) / sum(sizes)
    assert results["mmlu"]["acc"] == pytest.approx(weighted)
    assert results["mmlu"]["acc_macro"] == pytest.approx(sum(accuracies) / 57)
    assert results["mmlu"]["acc_macro"] != pytest.approx(results["mmlu"]["acc"])
    # A one-document subject has no standard error, so the groups have none either (lm-eval: "N/A").
    assert results["mmlu"]["acc_stderr"] is None and results["mmlu"]["acc_macro_stderr"] is None
    assert results["mmlu_humanities"]["acc_macro_stderr"] == pytest.approx(
        math.sqrt(sum(results[f"mmlu_{s}"]["acc_stderr"] ** 2 for s in MMLU_SUBJECTS["humanities"].split())) / 13)
    table = markdown({"tasks": ["mmlu"], **report})
    assert "| mmlu | 5 | acc |" in table and "|   mmlu_stem | 5 | acc_macro |" in table and "anatomy" not in table


def test_metrics() -> None:
    assert mc2([-1.0, -1.0, -1000.0], [1, 0, 0]) == pytest.approx(0.5)
    assert mc2([-2000.0, -2001.0], [0, 1]) == pytest.approx(1 / (1 + math.e))  # no 0/0 for long answers
    answer = "Twice 600 is <<2*600=1200>>1200.\n#### 1,200"
    assert gsm8k_scores("1,200 in all.\n#### 1200", answer) == {"exact_match": 1.0, "exact_match_flexible": 1.0}
    assert gsm8k_scores("It costs $1,200.", answer) == {"exact_match": 0.0, "exact_match_flexible": 1.0}
    assert gsm8k_scores("#### 12", answer) == {"exact_match": 0.0, "exact_match_flexible": 0.0}


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_command_writes_results_and_compares_two(model_dir: Path, data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    base = ["eval", "--model", str(model_dir), "--tasks", "arc_challenge,truthfulqa_mc2,gsm8k", "--data-dir",
            str(data), "--limit", "2", "--batch-size", "4"]
    code, out, err = run_cli(capsys, *base, "--out", str(tmp_path / "base.json"))
    assert code == 0, err
    assert "| arc_challenge | 25 | acc_norm |" in out and "| gsm8k | 5 | exact_match_flexible |" in out
    report = json.loads((tmp_path / "base.json").read_text())
    assert report["tasks"] == ["arc_challenge", "truthfulqa_mc2", "gsm8k"]
    assert report["model"]["source"] == str(model_dir) and report["config"]["fewshot_seed"] == 1234
    assert 0 <= report["results"]["truthfulqa_mc2"]["mc2"] <= 1
    assert report["results"]["arc_challenge"]["samples"] == 2

    code, out, err = run_cli(capsys, *base, "--num-fewshot", "1", "--out", str(tmp_path / "other.json"), "--json")
    assert code == 0, err
    other = json.loads(out)
    assert other["results"]["arc_challenge"]["num_fewshot"] == 1
    assert other["results"]["truthfulqa_mc2"]["num_fewshot"] == 0  # lm-eval never overrides a 0-shot task

    code, out, err = run_cli(capsys, "eval", "--compare", str(tmp_path / "base.json"), str(tmp_path / "other.json"))
    assert code == 0, err
    assert "| arc_challenge | acc_norm |" in out and (tmp_path / "base_vs_other.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_cli(capsys, "eval", "--compare", str(tmp_path / "base.json"), str(tmp_path / "other.json"),
                           "--plot", str(tmp_path / "chart.png"), "--json")
    deltas = json.loads(out)["deltas"]
    first = next(d for d in deltas if d["task"] == "arc_challenge" and d["metric"] == "acc")
    arc_a, arc_b = report["results"]["arc_challenge"], other["results"]["arc_challenge"]
    expected = (arc_a["acc"], arc_b["acc"], arc_b["acc"] - arc_a["acc"])
    assert (first["a"], first["b"], first["delta"]) == pytest.approx(expected)
    assert (tmp_path / "chart.png").is_file()


def broken_data(root: Path, data: Path) -> Path:
    """arc_challenge with a row lacking 'question', hellaswag without its validation file, winogrande as is."""
    import shutil

    for task in ("arc_challenge", "hellaswag", "winogrande"):
        shutil.copytree(data / task, root / task)
    rows = read_rows(root / "arc_challenge/test.jsonl")
    rows[1]["query"] = rows[1].pop("question")
    (root / "arc_challenge/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "hellaswag/validation.jsonl").unlink()
    rows = read_rows(root / "winogrande/train.jsonl")
    del rows[4]["option2"]
    (root / "winogrande/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "arc_challenge,arc_easy"], "unknown task 'arc_easy'; known tasks: arc_challenge, hellaswag, "
                                            "truthfulqa_mc2, winogrande, gsm8k, mmlu,"),
    (["--preset", "open"], "unknown preset 'open'; presets: leaderboard"),
    (["--tasks", "hellaswag"], "no validation split of Rowan/hellaswag: looked for {root}/hellaswag/validation.jsonl"),
    (["--tasks", "arc_challenge"], "{root}/arc_challenge/test.jsonl: row 2 has no column 'question'"),
    (["--tasks", "winogrande"], "{root}/winogrande/train.jsonl: row 5 has no column 'option2'"),
    (["--tasks", "winogrande", "--limit", "0"], "--limit must be at least 1"),
    (["--tasks", "demo_juggle"], "unknown task 'demo_juggle'"),
    ([], "give --tasks"),  # only the demo model has a default task
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, data: Path, tmp_path: Path,
                                          tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    root = broken_data(tmp_path / "data", data)
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--data-dir", str(root), *args)
    assert code == 2 and out == ""
    assert err.startswith("error: " + message.format(root=root)) and err.count("\n") == 1, err


def test_compare_and_perplexity_errors(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    (tmp_path / "text.txt").write_text(CORPUS[0])
    for args, message in [
        (["eval", "--compare", str(tmp_path / "notes.json"), str(tmp_path / "missing.json")],
         f"{tmp_path / 'notes.json'} is not a report of `llamaforge eval --out`"),
        (["perplexity", "--model", str(tiny_model_dir), str(tmp_path / "nothing.txt")], "text file"),
        (["perplexity", "--model", str(tiny_model_dir), str(tmp_path / "text.txt"), "--context", "32", "--stride",
          "32"], "--stride must be at least 1 and less than --context (32)"),
    ]:
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and err.startswith("error: " + message) and err.count("\n") == 1, err


def test_perplexity_matches_transformers(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    text = "\n\n".join(CORPUS[:12])
    llm = llamaforge.load(tiny_model_dir)
    ours = perplexity(llm, text, context=64, stride=24, progress=False)
    assert perplexity(llm, text, context=64, stride=24, batch_size=3, progress=False).nll == pytest.approx(ours.nll)

    # HF's perplexity guide: windows of 64 every 24 tokens, only the new tokens of each labelled.
    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ids = torch.tensor([llm.tokenizer.encode(text, bos=True)])
    nll_sum, n_tokens, previous_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], 24):
        end = min(begin + 64, ids.shape[1])
        labels = ids[:, begin:end].clone()
        labels[:, :-(end - previous_end)] = -100
        with torch.no_grad():
            loss = model(ids[:, begin:end], labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        nll_sum, n_tokens, previous_end = nll_sum + loss.item() * scored, n_tokens + scored, end
        if end == ids.shape[1]:
            break
    assert ours.tokens == n_tokens == ids.shape[1] - 1
    assert ours.perplexity == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-5)
    assert ours.bits_per_byte == pytest.approx(nll_sum / math.log(2) / len(text.encode()), rel=1e-5)

    (tmp_path / "text.txt").write_text(text)
    code, out, err = run_cli(capsys, "perplexity", "--model", str(tiny_model_dir), str(tmp_path / "text.txt"),
                             "--context", "64", "--stride", "24", "--json")
    assert code == 0, err
    assert json.loads(out)["perplexity"] == pytest.approx(ours.perplexity, rel=1e-6)
    (tmp_path / "short.txt").write_text("Llamas hum.")
    code, out, err = run_cli(capsys, "perplexity", "--model", str(tiny_model_dir), str(tmp_path / "short.txt"))
    assert code == 0 and re.search(r"\(\d+ tokens, 11 bytes, 1 window of 128 tokens every 64, ", out), out


def test_demo_task_asks_in_the_chat_format_and_reads_the_shipped_problems(tmp_path: Path) -> None:
    from llamaforge.checkpoint import DEMO_DIR
    from llamaforge.eval.tasks import DemoSkill

    demo = llamaforge.load()
    runs = prepare(["demo_addition_2digit", "demo_count"], DataSource(None), limit=3)
    shipped = read_rows(DEMO_DIR / "heldout.jsonl")
    assert [run.docs for run in runs] == [
        [row for row in shipped if row["skill"] == "addition" and min(row["key"]) >= 10][:3],
        [row for row in shipped if row["skill"] == "count"][:3]]
    doc = runs[0].docs[0]
    # The prompt is the dialog LLM.chat would send: the held-out exchanges, if any, then the question.
    assert runs[0].prompts[0] == [{"role": "user", "content": doc["question"]}]
    dialog = next(row for row in shipped if row["variant"] == "multiturn")
    assert prepare([f"demo_{dialog['skill']}_multiturn"], DataSource(None), limit=1)[0].prompts[0] == [
        *dialog["history"], {"role": "user", "content": dialog["question"]}]

    # A --data-dir with a demo/ folder replaces the shipped problems; one without it does not.
    (tmp_path / "demo").mkdir()
    wrong = {**doc, "answer": doc["answer"].replace("=", "is")}
    (tmp_path / "demo" / "test.jsonl").write_text(json.dumps(doc) + "\n" + json.dumps(wrong) + "\n")
    report = evaluate(demo, prepare(["demo_addition"], DataSource(tmp_path)), progress=False)
    assert report["results"]["demo_addition"] == pytest.approx({"exact_match": 0.5, "exact_match_stderr": 0.5,
                                                               "samples": 2, "num_fewshot": 0})
    with pytest.raises(EvalDataError, match="demo_spell: the test split of llamaforge's demo data has none"):
        prepare(["demo_spell"], DataSource(tmp_path))
    (tmp_path / "demo" / "test.jsonl").unlink()
    (tmp_path / "demo").rmdir()
    assert prepare(["demo_spell"], DataSource(tmp_path), limit=1)[0].docs[0]["skill"] == "spell"
    assert isinstance(make_task("demo_spell"), DemoSkill)


def test_perplexity_checks_what_4_bit_weights_cost(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The demo model on its own held-out problems: NF4 weights score close to the bf16 ones, not the same."""
    from llamaforge.checkpoint import DEMO_DIR

    rows = read_rows(DEMO_DIR / "heldout.jsonl")[::7]
    (tmp_path / "text.txt").write_text("\n".join(f"[INST] {r['question']} [/INST] {r['answer']}" for r in rows))
    scores = {}
    for quantize in ([], ["--quantize", "nf4"]):
        code, out, err = run_cli(capsys, "perplexity", str(tmp_path / "text.txt"), "--context", "512", "--json",
                                 *quantize)
        assert code == 0, err
        scores[bool(quantize)] = json.loads(out)["bits_per_byte"]
    assert scores[True] != scores[False] and abs(scores[True] / scores[False] - 1) < 0.02, scores


def test_running_out_of_memory_names_the_batch_size(model_dir: Path, data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from llamaforge.model import Llama

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Llama, "forward", out_of_memory)
    (tmp_path / "text.txt").write_text(CORPUS[0])
    for command, unit in ((["eval", "--tasks", "arc_challenge", "--data-dir", str(data)], "documents"),
                          (["perplexity", str(tmp_path / "text.txt")], "windows")):
        code, out, err = run_cli(capsys, *command, "--model", str(model_dir), "--batch-size", "16")
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"error: out of cpu memory with --batch-size 16 ({unit} per forward pass); lower "
                              "--batch-size")


def test_the_comparison_chart_legend_covers_no_bar(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from llamaforge.eval.report import Delta, plot_comparison

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    deltas = [Delta(f"task_{i}", "acc", 0.9 + i / 100, 0.95) for i in range(5)]  # long bars reach the right edge
    plot_comparison(deltas, "base", "tuned", tmp_path / "chart.png")
    figure = figures[0]
    renderer = figure.canvas.get_renderer()
    legend = figure.legends[0].get_window_extent(renderer)
    bars = [patch.get_window_extent(renderer) for patch in figure.axes[0].patches]
    assert len(bars) == 10 and not any(legend.overlaps(bar) for bar in bars)
    assert not legend.overlaps(figure.axes[0].get_window_extent(renderer))
    close(figure)
