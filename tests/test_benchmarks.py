"""The benchmark scripts still run, on tiny shapes, and agree with their baselines where they must."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamaforge.checkpoint.gguf import write_gguf
from llamaforge.quantize import kernels

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytest.importorskip("transformers")


def run_json(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_decode_benchmark_generates_what_transformers_and_llama_cpp_generate() -> None:
    """fp32 greedy tokens agree with HF's (and llama.cpp's, where LLAMAFORGE_LLAMA_CPP_PYTHON names its python)."""
    llama_cpp = os.environ.get("LLAMAFORGE_LLAMA_CPP_PYTHON")
    modes = "fp32,bf16,int4" + (",q4_0,q4_k_m" if llama_cpp else "")  # llama.cpp's own files, loaded by both
    report = run_json("decode.py", "--preset", "tiny", "--repeats", "1", "--new-tokens", "8", "--modes", modes,
                      "--layered", *(["--llamacpp-python", llama_cpp] if llama_cpp else []))
    by_mode = {row["mode"]: row for row in report["results"]}
    assert set(by_mode) == set(modes.split(","))
    assert by_mode["fp32"]["hf"]["tokens_agree"] == 8 and len(by_mode["fp32"]["llamaforge"]["tokens"]) == 8
    assert "hf" not in by_mode["int4"] and by_mode["int4"]["weight_bytes"] < by_mode["bf16"]["weight_bytes"]
    if llama_cpp:
        assert by_mode["fp32"]["llama.cpp"]["tokens_agree"] == 8
        # The same file's weights on both sides (tiny's rows are too short for k-quants: llama.cpp stores Q4_K_M's
        # layers in wider types, which load as int8 groups, more bytes than int4's).
        assert by_mode["q4_k_m"]["llama.cpp"]["tokens_agree"] >= 1
        assert by_mode["q4_k_m"]["weight_bytes"] > by_mode["int4"]["weight_bytes"]
        # llama.cpp's Q4_0 file as stored: int4's codes (the same quantizer), its output layer as the file has it.
        assert by_mode["q4_0"]["llama.cpp"]["tokens_agree"] >= 1
        assert by_mode["q4_0"]["gguf_bytes"] == by_mode["int4"]["gguf_bytes"]  # one file, quantized once
    assert all(row["llamaforge"]["decode_tok_s"] > 0 for row in by_mode.values())
    if kernels.native_decode() is not None:  # bf16 and int4 decode through the fused layers: the layered path's tokens
        assert all(by_mode[mode]["llamaforge layered"]["tokens_agree"] == 8 for mode in ("bf16", "int4"))
    assert "llamaforge layered" not in by_mode["fp32"]
    if kernels.native_decode() is not None:  # the machine's ceilings, measured in the same rounds
        ceiling = by_mode["int4"]["ceiling"]
        assert ceiling["dot"] == "int8" and by_mode["bf16"]["ceiling"]["dot"] == "bf16"
        assert by_mode["fp32"]["ceiling"]["dot"] is None and len(ceiling["rounds"]) == 1
        assert 0 < by_mode["int4"]["llamaforge"]["decode_of_ceiling"] == pytest.approx(
            by_mode["int4"]["llamaforge"]["decode_gb_s"] / ceiling["read_gb_s"])


def test_decode_benchmark_says_its_file_modes_need_llama_cpp() -> None:
    """q4_k_m runs llama.cpp's own file: without llama.cpp's quantizer there is none; the error says what to pass."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "decode.py"), "--modes", "int4,q4_k_m"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "LLAMACPP_PYTHON": ""})
    assert result.returncode == 2 and "q4_k_m" in result.stderr and "--llamacpp-python" in result.stderr


def test_ceilings_do_all_the_work_they_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine-ceiling measurements read every byte and run every dot product they count."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from ceilings import Ceilings

    ceilings = Ceilings.load(threads=2)
    if ceilings is None:
        pytest.skip("benchmarks/ceilings.c needs an x86-64 CPU with AVX-512 VNNI and BF16 or AVX2, and a C compiler")
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(-2**31, 2**31, (3 * 1024 * 64,), dtype=torch.int64, generator=generator).to(torch.int32)
    assert ceilings.read_words(data) == int(data.to(torch.int64).sum()) % 2**32
    assert ceilings.int8_dots(1000) == 1000 * 12 * 64 * 2  # rounds x chains x 64 products of 1 x threads
    assert ceilings.bf16_dots(1000) == 1000 * 12 * 16 * 2 * 2.0**-16 * 2  # ... lanes x 2 products of 2^-16 ...
    assert ceilings.read_gb_s(megabytes=64, repeats=1) > 0 and ceilings.int8_gmac_s(1000, 1) > 0


@pytest.mark.slow
def test_prefix_cache_benchmark_answers_alike_with_and_without_the_cache() -> None:
    report = run_json("prefix_cache.py", "--preset", "tiny", "--turns", "3", "--system-tokens", "10",
                      "--message-tokens", "20", "--answer-tokens", "4", "--repeats", "1")
    assert report["same_answers"] is True
    assert [row["history_tokens"] for row in report["turns"]] == [11, 35, 59]
    # Turns 2 and 3 reuse their histories but the last answer token, (35 - 1) + (59 - 1) of 31 + 55 + 79 tokens,
    # and turn 1 the BOS the warm-up chat left in a slot.
    assert report["prefix_cache"]["hits"] == 1 + 92 and report["prefix_cache"]["queries"] == 165


@pytest.mark.slow
def test_structured_benchmark_answers_are_all_valid() -> None:
    pytest.importorskip("llguidance")
    report = run_json("structured.py", "--requests", "8", "--repeats", "1")
    assert report["valid"] == report["requests"] == 8
    assert all(cost > 0 for cost in report["mask_us_per_token"].values())


@pytest.mark.slow
def test_adapters_benchmark_serves_the_base_rows_unchanged() -> None:
    report = run_json("adapters.py", "--requests", "5", "--clients", "5", "--adapters", "2", "--repeats", "1")
    assert report["base_rows_same"] is True and report["ratio"] > 0


@pytest.mark.slow
def test_load_memory_benchmark_loads_in_the_target_dtype() -> None:
    report = run_json("load_memory.py", "--layers", "1", "--cases", "llamaforge-bf16,hf-bf16")
    assert [row["case"] for row in report["results"]] == ["llamaforge-bf16", "hf-bf16"]
    assert all(row["param_dtypes"] == ["bfloat16"] for row in report["results"])


def test_load_time_benchmark_times_each_side_in_its_own_process(tiny_model_dir: Path) -> None:
    """Each side loads in a fresh process, a checkout given with --tree from that checkout (here this one again);
    llama.cpp's side is refused for anything but a GGUF file."""
    repository = BENCHMARKS.parent
    report = run_json("load_time.py", str(tiny_model_dir), "--quantize", "int4", "--rounds", "2",
                      "--tree", str(repository))
    assert set(report["results"]) == {"llamaforge", f"llamaforge@{repository}"}
    for row in report["results"].values():
        assert len(row["load_s"]) == 2 and all(seconds > 0 for seconds in row["load_s"])
        assert 0 < row["peak_anon_gib"] <= row["peak_rss_gib"]
    assert report["results"]["llamaforge"]["vs_llamaforge"] == 1
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "load_time.py"), str(tiny_model_dir),
                              "--llamacpp-python", sys.executable], capture_output=True, text=True)
    assert refused.returncode == 2 and "--llamacpp-python needs a .gguf file" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["f32", "q4_0"])
def test_serve_benchmark_batching_gives_the_same_text(weights: str) -> None:
    """(a) batching and (b) one at a time answer alike, from float32 weights or one Q4_0 GGUF for every server;
    llama.cpp (c) runs too where its server is installed."""
    report = run_json("serve.py", "--preset", "tiny", "--weights", weights)
    assert report["setup"]["weights"] == weights
    one_at_a_time = [r for r in report["ratios"] if r["versus"] == "b"]
    assert one_at_a_time and all(r["same_text"] == r["requests"] for r in one_at_a_time)
    llama_cpp = [r for r in report["ratios"] if r["versus"] == "c"]
    assert report["llama_cpp"]["skipped"] == (not llama_cpp)
    assert all(r["tok_s_ratio"] > 0 for r in llama_cpp)


@pytest.mark.slow
def test_finetune_benchmark_trains_the_same_model_as_peft() -> None:
    pytest.importorskip("peft")
    report = run_json("finetune.py", "--preset", "tiny", "--seq-len", "64", "--steps", "1", "--warmup", "1",
                      "--sides", "llamaforge,llamaforge-qlora,hf")
    assert report["vs_hf"]["llamaforge"]["first_loss_delta"] < 1e-4  # same weights, data and LoRA maths
    assert report["vs_hf"]["llamaforge-qlora"]["first_loss_delta"] < 0.05  # 4-bit base: close, not equal
    assert all(row["tokens_per_s"] > 0 for row in report["results"].values())


@pytest.mark.slow
def test_eval_benchmark_scores_as_lm_eval_does() -> None:
    pytest.importorskip("lm_eval")
    report = run_json("eval.py", "--preset", "tiny", "--docs", "2", "--tasks", "arc_challenge,gsm8k", "--threads", "1")
    assert report["max_score_difference"] < 1e-6  # the same scores as lm-eval's, or the timing means nothing
    tasks = report["tasks"]
    assert list(tasks) == ["arc_challenge", "gsm8k"] and tasks["gsm8k"]["requests"] == 2
    assert tasks["arc_challenge"]["requests"] >= 2 * 3  # 3 to 5 choices per question
    assert all(t[side]["requests_cpu_s"] > 0 for t in tasks.values() for side in ("llamaforge", "lm_eval"))
    assert report["leaderboard_mix"]["speedup"]["requests_cpu"] > 0


@pytest.mark.slow
def test_soak_smoke() -> None:
    """Mixed valid, invalid and disconnecting traffic: no 5xx, hang, leaked slot or unexpected answer."""
    pytest.importorskip("uvicorn")
    report = run_json("soak.py", "--requests", "120", "--concurrency", "16")
    totals = report["totals"]
    assert (totals["5xx"], totals["hang"], totals["unexpected"], report["server"]["leaked_slots"]) == (0, 0, 0, 0)
    groups = report["groups"]
    assert all(groups[group]["requests"] >= 1 for group in ("valid", "invalid", "disconnecting"))
    invalid = groups["invalid"]
    assert invalid["4xx"] == invalid["requests"] - invalid["busy"] >= 1
    assert report["server"]["health_status"] == 200 and report["ok"]


@pytest.mark.slow
def test_speculative_benchmark_speculates_in_the_engine_with_plain_output() -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / "speculative.py"), "--questions", "4", "--repeats", "1",
                             "--speculate", "4", "--engine", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| demo answers")]
    engine = [row for row in rows if "engine, 2 at once" in row[0]]
    assert len(rows) == 4 and [row[1].strip() for row in engine] == ["0", "4"]
    assert all(row[-1].strip() == "yes" for row in rows)  # every pass's output equals plain decoding's
    assert float(engine[1][4]) > 0  # the engine accepted drafts


@pytest.mark.slow
def test_attention_benchmark_compares_the_kernel_with_torch() -> None:
    from llamaforge.quantize import kernels

    if kernels.native_bf16() is None:
        pytest.skip("the bfloat16 kernel needs x86-64 AVX-512 BF16 or AVX2 and a C compiler")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "attention.py"), "--calls", "3", "--lengths", "40,300",
                             "--chunk", "32", "--chunk-lengths", "64", "--preset", "tiny", "--rounds", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    lengths = [row for row in rows if row[0].strip() in ("40", "300")]
    assert len(lengths) == 2 and all(float(row[4]) > 0.99 for row in lengths)  # the kernel's outputs are torch's
    chunk = [row for row in rows if row[0].strip() == "64"]  # against SDPA, which does not round the scores
    assert len(chunk) == 1 and float(chunk[0][4]) > 0.2 and float(chunk[0][1]) > 0 and float(chunk[0][2]) > 0
    assert [row[0].strip() for row in rows if row[0].strip() in ("eager", "compiled")] == ["eager", "compiled"]


def test_cache_policy_benchmark_compares_the_engine_with_full_block_reuse() -> None:
    """One user: both reuse most of each prompt, the engine a little more (it copies the start of a partly shared
    block); four users over two sequences: the engine's pool keeps every conversation (a slot per sequence kept only
    two: 31% where blocks kept 72% in the measurement that made the cache paged)."""
    report = run_json("cache_policy.py", "--users", "1,4", "--slots", "2", "--turns", "3")
    one, four = report["rows"]
    assert one["full_blocks_hit_rate"] > 0.5
    assert one["engine_hit_rate"] > one["full_blocks_hit_rate"]
    assert four["engine_hit_rate"] > four["full_blocks_hit_rate"] > 0.5


def test_engine_ab_benchmark_runs_each_checkout_in_its_own_process() -> None:
    """The same checkout on both sides: the same tokens, and a throughput for every run of each side."""
    root = str(BENCHMARKS.parent)
    report = run_json("engine_ab.py", "--before", root, "--after", root, "--dim", "64", "--layers", "2", "--heads",
                      "4", "--prompts", "3", "--new-tokens", "4", "--rounds", "1", "--repeats", "1")
    assert report["same_tokens"] and len(report["runs"]["before"]) == len(report["runs"]["after"]) == 1
    assert report["ratio"] > 0 and all(v > 0 for v in report["medians"].values())


@pytest.mark.slow
def test_dpo_benchmark_trains_both_sides_from_the_same_start() -> None:
    pytest.importorskip("trl")
    report = run_json("dpo.py", "--layers", "2", "--dim", "128", "--steps", "2", "--warmup", "1", "--pairs", "8")
    ours, theirs = report["results"]["llamaforge"], report["results"]["trl"]
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], abs=1e-5) == pytest.approx(0.693147, abs=1e-5)
    assert ours["step_s"] > 0 and theirs["step_s"] > 0 and report["speedup"] > 0


def test_hugepages_benchmark_times_the_same_model_on_both_page_sizes() -> None:
    from llamaforge.quantize import kernels

    if kernels.native_decode() is None:
        pytest.skip("the fused decode layers need x86-64 AVX-512 (VNNI, BF16) or AVX2 and a C compiler")
    report = run_json("hugepages.py", "--preset", "tiny", "--rounds", "1", "--steps", "1")
    rows = report["results"]
    assert [row["mode"] for row in rows] == ["bf16", "int8", "int4"] and all(row["same_logits"] for row in rows)
    assert all(row["4 KB pages"]["huge_page_kb"] == 0 and row["speedup"] > 0 for row in rows)


OTHER_ROUNDING = '("qlinear.c", "float scale = amax / 127.0f;", "float scale = amax / 126.0f;")'


def kernel_ab_rows(tmp_path: Path, variants: dict[str, str], *workload: str) -> dict[str, dict]:
    """kernel_ab.py's rows by variant, for VARIANTS {name: one edit's Python text} on the tiny preset, one round."""
    from llamaforge.quantize import kernels

    if kernels.native_decode() is None:
        pytest.skip("the kernels need x86-64 AVX-512 (VNNI, BF16) or AVX2 and a C compiler")
    path = tmp_path / "variants.py"
    path.write_text("VARIANTS = {" + ", ".join(f"{name!r}: [{edit}]" for name, edit in variants.items()) + "}")
    report = run_json("kernel_ab.py", str(path), "--preset", "tiny", "--rounds", "1", "--calls", "1", *workload)
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["base"]["same_result"] and all(row["ms"] > 0 for row in rows.values())
    return rows


def test_kernel_ab_benchmark_builds_each_variant_and_tells_which_keep_the_logits(tmp_path: Path) -> None:
    rows = kernel_ab_rows(tmp_path, {"4 rows a tile": '("qlinear.c", "#define Q_M_TILE 8 ", "#define Q_M_TILE 4 ")',
                                     "other rounding": OTHER_ROUNDING})
    assert rows["4 rows a tile"]["same_result"]  # the same sums in another tiling
    assert not rows["other rounding"]["same_result"]  # activations quantized to another scale


def test_kernel_ab_benchmark_times_one_linear_or_attention_call(tmp_path: Path) -> None:
    variants = {"other rounding": OTHER_ROUNDING,
                "other score scale": '("bf16linear.c", "1.0f / sqrtf((float)D)", "1.0f / sqrtf((float)D + 1.0f)")'}
    linear = kernel_ab_rows(tmp_path, variants, "--mode", "int8", "--linear", "40,96,3")
    attention = kernel_ab_rows(tmp_path, variants, "--attention", "3,21")
    dmin_as_d = {"dmin as d": '("qlinear.c", "(const __m256i *)(super + 2 * TILE))", "(const __m256i *)super)")'}
    k_quant = kernel_ab_rows(tmp_path, dmin_as_d, "--mode", "q4_k", "--linear", "40,256,3")
    # Each workload sees only the edit to its own kernel.
    assert not k_quant["dmin as d"]["same_result"]  # a Q4_K layer's mins scaled by d
    assert not linear["other rounding"]["same_result"] and linear["other score scale"]["same_result"]
    assert attention["other rounding"]["same_result"] and not attention["other score scale"]["same_result"]


def test_kernel_ab_benchmark_runs_a_gguf_files_model(tmp_path: Path, tiny_llm) -> None:
    """--gguf: the model a file loads as (here Q8_0, kept as int8 in groups of 32), a prefill of it."""
    path = write_gguf(tiny_llm.model.state_dict(), tiny_llm.config, tiny_llm.tokenizer, tmp_path / "model.gguf", "q8_0")
    rows = kernel_ab_rows(tmp_path, {"other rounding": OTHER_ROUNDING}, "--gguf", str(path), "--prefill", "5")
    assert not rows["other rounding"]["same_result"]  # its int8 layers went through the edited kernel
