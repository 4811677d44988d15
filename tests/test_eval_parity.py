"""Every score equals lm-evaluation-harness 0.4.13's (HF backend, same weights, same files), to 1e-6.

lm-eval runs offline on task YAMLs that include its own task definitions and point `dataset_path: json`
at the files the tests write, so the comparison covers its prompts, few-shot draws, tokenization,
truncation, generation and metrics, not a re-typed copy of them.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'llamaforge[eval]')")

from factories import LEADERBOARD_SHOTS, run_lm_eval, write_eval_data, write_eval_model  # noqa: E402

import llamaforge  # noqa: E402
from llamaforge.eval.data import DataSource  # noqa: E402
from llamaforge.eval.evaluator import evaluate, prepare  # noqa: E402
from llamaforge.eval.fewshot import FewshotSampler  # noqa: E402
from llamaforge.eval.metrics import GSM8K_FLEXIBLE, GSM8K_STRICT, exact_match, extract  # noqa: E402
from llamaforge.eval.scoring import (  # noqa: E402
    cut_at_stops,
    encode_pair,
    generate_until,
    loglikelihoods,
    tokenize_request,
)
from llamaforge.eval.tasks import MMLU_CATEGORY  # noqa: E402
from llamaforge.sampling import SamplingParams  # noqa: E402

TASKS = list(LEADERBOARD_SHOTS)  # arc_challenge, hellaswag, truthfulqa_mc2, winogrande, gsm8k; MMLU by subject
SUBJECTS = tuple(MMLU_CATEGORY)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eval_data(tmp_path_factory.mktemp("eval-data"), n_eval=4, subjects=SUBJECTS)


def our_loglikelihoods(llm, run) -> list[list[float]]:
    groups = [[tokenize_request(llm.tokenizer, c, x, llm.config.context_length) for c, x in requests]
              for requests in run.requests]
    return loglikelihoods(llm.model, groups, batch_size=3, progress=False)


def hf_decoded_generations(llm, run, model_dir: Path) -> list[str]:
    """Our greedy generations, decoded by the HF tokenizer lm-eval uses and cut at the stop sequences.

    The tokens must be lm-eval's. Our own text decodes them with SentencePiece (Meta's decoder), which differs
    from HF's only where a random model emits invalid UTF-8 byte tokens: HF turns the whole run of bytes into
    replacement characters, SentencePiece only the invalid bytes.
    """
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = generate_until(llm, run.prompts, run.task.until, run.task.max_new_tokens, 4, progress=False)
    room = llm.config.context_length - run.task.max_new_tokens
    params = SamplingParams(max_new_tokens=run.task.max_new_tokens, temperature=0.0, stop=run.task.until)
    decoded = []
    for prompt, text in zip(run.prompts, texts, strict=True):
        token_ids = llm.generate(llm.tokenizer.encode(prompt, bos=True)[-room:], params=params).token_ids
        assert text == cut_at_stops(llm.tokenizer.decode(token_ids), run.task.until)
        decoded.append(cut_at_stops(hf_tokenizer.decode(token_ids, skip_special_tokens=True), run.task.until))
    return decoded


def assert_same_metrics(ours: dict, theirs: dict) -> None:
    """Every metric and standard error lm-eval reports, ours to 1e-6."""
    for task, metrics in theirs.items():
        assert metrics, f"lm-eval reported nothing for {task}"
        for metric, value in metrics.items():
            mine = ours[task][metric]
            if value is None:
                assert mine is None, (task, metric, mine)
            else:
                assert math.isclose(mine, value, abs_tol=1e-6), (task, metric, mine, value)


def assert_same_requests(llm, runs, samples: dict, model_dir: Path) -> None:
    """Each request's text equals lm-eval's; so do the log-likelihoods (float32 sums: to 1e-6 relative) and texts."""
    for run in runs:
        logged = samples[run.task.name]
        assert len(logged) == len(run.docs), run.task.name
        if run.task.kind == "generate":
            assert [s["arguments"][0][0] for s in logged] == run.prompts
            assert [s["resps"][0][0] for s in logged] == hf_decoded_generations(llm, run, model_dir)
            continue
        assert [[tuple(args) for args in s["arguments"]] for s in logged] == run.requests, run.task.name
        expected = [[resp[0][0] for resp in s["resps"]] for s in logged]
        for mine, theirs in zip(our_loglikelihoods(llm, run), expected, strict=True):
            assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-5), run.task.name


@pytest.mark.slow
def test_every_task_scores_as_lm_eval(data: Path, tiny_tokenizer_path: Path, tmp_path: Path) -> None:
    model_dir = write_eval_model(tmp_path / "model", tiny_tokenizer_path)
    llm = llamaforge.load(model_dir)
    runs = prepare([*TASKS, "mmlu"], DataSource(data))
    ours = evaluate(llm, runs, batch_size=3, progress=False)["results"]
    theirs, samples = run_lm_eval(model_dir, data, TASKS, SUBJECTS, batch_size=4, work_dir=tmp_path)
    assert {"mmlu", "mmlu_stem", "mmlu_other", "arc_challenge", "gsm8k"} <= theirs.keys()
    assert len(theirs) == len(TASKS) + 1 + len(set(MMLU_CATEGORY.values())) + len(SUBJECTS)
    assert_same_metrics(ours, theirs)
    assert_same_requests(llm, runs, samples, model_dir)
    # Not a tie of degenerate numbers: the model's choices differ from document to document.
    assert 0 < ours["truthfulqa_mc2"]["mc2"] < 1 and 0 < ours["mmlu"]["acc"] < 1


@pytest.mark.slow
def test_an_adapter_scores_as_lm_eval_with_peft(data: Path, tiny_tokenizer_path: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """`llamaforge eval --adapter A` against lm-eval's `peft=A`: the LoRA adapter a fine-tune writes, evaluated."""
    from factories import EVAL_CONFIG, random_model

    from llamaforge.cli import main
    from llamaforge.lora import LoraConfig, add_lora, lora_layers, save_adapter

    model_dir = write_eval_model(tmp_path / "model", tiny_tokenizer_path, seed=1)
    tuned = add_lora(random_model(EVAL_CONFIG, seed=1, std=0.08), LoraConfig(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter's B is nonzero; the zero init would change nothing
        for _, layer in lora_layers(tuned):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.2)
    save_adapter(tuned, tmp_path / "adapter", base_model=str(model_dir))
    tasks = ["arc_challenge", "winogrande", "gsm8k"]
    flags = ["--tasks", ",".join(tasks), "--data-dir", str(data), "--limit", "3", "--batch-size", "3"]
    assert main(["eval", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), *flags,
                 "--out", str(tmp_path / "tuned.json")]) == 0
    capsys.readouterr()
    ours = json.loads((tmp_path / "tuned.json").read_text())
    assert ours["model"]["adapter"] == str(tmp_path / "adapter")
    theirs, samples = run_lm_eval(model_dir, data, tasks, limit=3, batch_size=4, work_dir=tmp_path,
                                  peft=tmp_path / "adapter")
    assert_same_metrics(ours["results"], theirs)
    # The adapter is really applied: lm-eval's log-likelihoods with it differ from the base model's.
    base_runs = prepare(["arc_challenge"], DataSource(data), limit=3)
    base = our_loglikelihoods(llamaforge.load(model_dir), base_runs[0])
    tuned_logged = [[resp[0][0] for resp in s["resps"]] for s in samples["arc_challenge"]]
    assert max(abs(a - b) for x, y in zip(base, tuned_logged, strict=True) for a, b in zip(x, y, strict=True)) > 1e-2


@pytest.mark.slow
def test_truncated_prompts_score_as_lm_eval(data: Path, tiny_tokenizer_path: Path, tmp_path: Path) -> None:
    # 40 tokens of context: lm-eval cuts each (context + continuation) from the left, per choice.
    model_dir = write_eval_model(tmp_path / "model", tiny_tokenizer_path, max_seq_len=40)
    llm = llamaforge.load(model_dir)
    tasks = ["arc_challenge", "hellaswag", "truthfulqa_mc2", "winogrande"]
    runs = prepare(tasks, DataSource(data), limit=3)
    theirs, samples = run_lm_eval(model_dir, data, tasks, limit=3, batch_size=4, work_dir=tmp_path)
    assert_same_metrics(evaluate(llm, runs, batch_size=2, progress=False)["results"], theirs)
    assert_same_requests(llm, runs, samples, model_dir)


def test_context_and_continuation_split_as_lm_eval(tiny_model_dir: Path) -> None:
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(tiny_model_dir), add_bos_token=True, device="cpu", dtype="float32")
    tokenizer = llamaforge.load(tiny_model_dir).tokenizer
    pairs = [("Question: how?\nAnswer:", " llama"), ("Answer: ", "two plus"), ("end with two spaces  ", "x"),
             ("newline at the end\n", "Next"), ("Café naïve", " jalapeño 🦙"), ("1234", "5678"),
             ("The llama", "s hum"), ("tab\t", " and space")]
    for context, continuation in pairs:
        assert encode_pair(tokenizer, context, continuation) == theirs._encode_pair(context, continuation)


def test_fewshot_draws_match_lm_eval() -> None:
    from lm_eval.api.samplers import ContextSampler, FirstNSampler

    pool = [{"id": i, "text": f"row {i}"} for i in range(40)]
    pool.insert(7, pool[3])  # a copy of a document in its own pool: lm-eval skips both
    docs = [pool[3], {"id": 99}, pool[11], pool[0]]
    for exclude in (False, True):
        ours = FewshotSampler(pool, first_n=False, exclude_doc=exclude)
        theirs = ContextSampler(pool, rnd=1234)
        for doc in docs * 3:
            assert ours.sample(5, doc) == theirs.sample(5, eval_doc=doc if exclude else None)
    assert FewshotSampler(pool, first_n=True, exclude_doc=False).sample(5, docs[0]) == FirstNSampler(pool).sample(5)


def test_gsm8k_answer_extraction_matches_lm_eval() -> None:
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)")
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    answer = "She pays 2 * $600 = $<<2*600=1200>>1200.\n#### 1,200"
    rng = random.Random(0)
    generated = ["So the answer is 1200.\n#### 1200", "#### 1,200.", "She pays $1,200.", "It is 7 and then 1200",
                 "no number here", "#### -3.5", " 1200 ", "#### $1,200\n\nQuestion:", "12 or 1,200?", "-7"]
    generated += [" ".join(rng.choice(["####", "$1,200", "12", "x", "3.", "-1", ","]) for _ in range(5))
                  for _ in range(40)]
    for text in generated:
        for ours, theirs in ((extract(GSM8K_STRICT, text, 0), strict), (extract(GSM8K_FLEXIBLE, text, -1), flexible)):
            assert ours == next(iter(theirs.apply([[text]], [{}])))[0]
            expected = exact_match_hf_evaluate([ours], [answer], ignore_case=True,
                                               regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"])
            assert exact_match(ours, answer) == expected["exact_match"]


@pytest.mark.slow
def test_lm_eval_scores_through_the_server_as_llamaforge_eval(data: Path, tiny_tokenizer_path: Path,
                                                              tmp_path: Path) -> None:
    """lm-eval's `local-completions` model pointed at a running server (its echo + logprobs requests, several
    prompts each) scores multiple-choice tasks to the numbers `llamaforge eval` gives on the same weights and files."""
    pytest.importorskip("fastapi")
    from factories import LiveServer

    from llamaforge.engine import Engine
    from llamaforge.server import create_app

    model_dir = write_eval_model(tmp_path / "model", tiny_tokenizer_path)
    llm = llamaforge.load(model_dir)
    tasks = ["arc_challenge", "hellaswag", "winogrande"]
    ours = evaluate(llm, prepare(tasks, DataSource(data)), batch_size=3, progress=False)["results"]
    engine = Engine(llm, max_batch_size=4)
    with LiveServer(create_app(llm, engine, model_name="tiny")) as server:
        theirs, _ = run_lm_eval(model_dir, data, tasks, batch_size=4, work_dir=tmp_path, server=server.url)
    # Every prompt was scored whole by the engine (scored prompts skip the prefix cache).
    assert engine.stats().prompt_tokens > 0 and engine.stats().prefix_cache_queries == 0
    assert set(theirs) == set(tasks)
    assert_same_metrics(ours, theirs)
    assert 0 < ours["hellaswag"]["acc"] < 1 or 0 < ours["arc_challenge"]["acc"] < 1
