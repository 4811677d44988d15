"""Builders for tiny models, tokenizers and checkpoint directories written on the fly."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llamaforge.config import ModelArgs
from llamaforge.model import Llama, init_weights

SHARED_ASSETS = Path(os.environ.get("LLAMAFORGE_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))

CORPUS = [
    "Once upon a time there was a small llama who liked to count: 1, 2, 3, 42, 1234.",
    "The quick brown fox jumps over the lazy dog. Café, naïve, jalapeño, Zürich.",
    "Llamas live in the Andes; they carry loads and hum when they are happy.",
    "def generate(prompt):\n    return model(prompt)  # code has  double  spaces",
    "[INST] What is two plus two? [/INST] Two plus two is four.",
    "東京は日本の首都です。 Emoji: 🦙🎉 and accents: àéîõü.",
] * 20


def train_tokenizer(directory: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE model with Llama's settings (byte fallback, digit split, BOS=1, EOS=2)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=1.0, minloglevel=2,
    )
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def random_model(config: ModelArgs, seed: int = 0, std: float = 0.2) -> Llama:
    """A float32 model with random weights large enough to give peaked, non-trivial logits."""
    return init_weights(Llama(config), seed=seed, std=std).eval()


def write_hf_dir(directory: Path, model: Llama, tokenizer: Path | None = None, shards: int = 1,
                 dtype: torch.dtype = torch.float32) -> Path:
    """An HF checkpoint directory: config.json, model.safetensors (or N shards + index), tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_config() | {"torch_dtype": str(dtype).replace("torch.", "")}
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    if shards == 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        names = list(state)
        weight_map = {}
        for index in range(shards):
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: state[name] for name in names[index::shards]}
            save_file(part, directory / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer is not None:
        (directory / tokenizer.name).write_bytes(tokenizer.read_bytes())
    return directory


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread, for real HTTP clients."""

    def __init__(self, app) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServeCommand:
    """`llamaforge serve ARGS` in a child process on a free port, answering /health inside the block."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "llamaforge", "serve", *args, "--port", str(self.port)]
        self.env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})

    def __enter__(self) -> ServeCommand:
        import time
        import urllib.request

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=self.env)
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"llamaforge serve did not start: {self.process.stderr.read()}") from None
                time.sleep(0.2)

    def __exit__(self, *exc_info) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# --- Evaluation: small task files in the hub datasets' schemas, and lm-evaluation-harness run on them ---

EVAL_WORDS = ("llama", "small", "count", "quick", "brown", "fox", "lazy", "dog", "Andes", "carry", "loads", "hum",
              "happy", "two", "plus", "four", "model", "prompt", "time", "river", "stone", "green", "light", "heavy",
              "water", "north", "cold", "warm", "song", "bread")


def _phrase(rng, low: int = 2, high: int = 5) -> str:
    return " ".join(rng.choice(EVAL_WORDS) for _ in range(rng.randint(low, high)))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def eval_rows(task: str, n: int, rng, split: str = "train", subject: str = "anatomy") -> list[dict]:
    """n rows of one dataset in its hub schema (allenai/ai2_arc, Rowan/hellaswag, cais/mmlu, truthful_qa
    multiple_choice, winogrande, gsm8k main), with the quirks the task definitions handle."""
    rows = []
    for i in range(n):
        if task == "arc_challenge":
            size = rng.choice((3, 4, 4, 5))
            labels = list("ABCDE"[:size]) if i % 3 else [str(k + 1) for k in range(size)]
            rows.append({"id": f"Mercury_{i}", "question": _phrase(rng, 3, 8).capitalize() + "?",
                         "choices": {"text": [_phrase(rng, 1, 4) for _ in labels], "label": labels},
                         "answerKey": rng.choice(labels)})
        elif task == "hellaswag":
            endings = [_phrase(rng, 2, 7) + rng.choice(("", ".", " [title] " + _phrase(rng), " [step] ok"))
                       for _ in range(4)]
            ctx_a, ctx_b = _phrase(rng, 3, 8).capitalize() + ".", rng.choice(("", "The LLAMA " + _phrase(rng, 1, 3)))
            rows.append({"ind": i, "activity_label": rng.choice(("Llamas", "Baking bread", "Walking a dog")),
                         "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}", "endings": endings,
                         "source_id": f"activitynet~v_{i}", "split": "val" if split == "validation" else split,
                         "split_type": "indomain", "label": str(rng.randrange(4))})
        elif task == "mmlu":
            rows.append({"question": " " + _phrase(rng, 3, 9) + "? ", "subject": subject,
                         "choices": [_phrase(rng, 1, 3) for _ in range(4)], "answer": rng.randrange(4)})
        elif task == "truthfulqa":
            size = rng.randint(2, 6)
            true = rng.randint(1, size - 1)
            rows.append({"question": _phrase(rng, 3, 8).capitalize() + "?",
                         "mc1_targets": {"choices": [_phrase(rng) for _ in range(4)], "labels": [1, 0, 0, 0]},
                         "mc2_targets": {"choices": [_phrase(rng, 2, 6) + "." for _ in range(size)],
                                         "labels": [1] * true + [0] * (size - true)}})
        elif task == "winogrande":
            first, second = rng.sample(("llama", "fox", "dog", "river", "model"), 2)
            rows.append({"sentence": f"The {first} gave the {second} a {_phrase(rng, 1, 2)} because _ was "
                                     f"{_phrase(rng, 1, 3)}.", "option1": first, "option2": second,
                         "answer": rng.choice(("1", "2"))})
        elif task == "gsm8k":
            a, b = rng.randint(2, 999), rng.randint(1000, 2500)
            rows.append({"question": f"A {_phrase(rng, 1, 2)} has {a} loads and gets {b} more. How many now?",
                         "answer": f"It has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} loads.\n#### {a + b:,}"})
    return rows


EVAL_SPLITS = {"arc_challenge": ("train", "test"), "hellaswag": ("train", "validation"), "mmlu": ("dev", "test"),
               "truthfulqa": (None, "validation"), "winogrande": ("train", "validation"), "gsm8k": ("train", "test")}


def write_eval_data(directory: Path, n_eval: int = 4, n_train: int = 30, seed: int = 0,
                    subjects: tuple[str, ...] = ("abstract_algebra", "anatomy", "world_religions"),
                    n_mmlu: int | None = None) -> Path:
    """Every task's splits as JSONL under `directory` in docs/eval.md's layout (`n_mmlu` documents per MMLU
    subject, default `n_eval`); HellaSwag's and Winogrande's train splits also hold a copy of their first
    evaluation row (few-shot sampling must skip it)."""
    import random

    rng = random.Random(seed)
    for task, (train_split, eval_split) in EVAL_SPLITS.items():
        for folder, subject in ([(f"mmlu/{s}", s) for s in subjects] if task == "mmlu" else [(task, "")]):
            evaluated = eval_rows(task, n_eval if n_mmlu is None or task != "mmlu" else n_mmlu, rng, eval_split,
                                  subject)
            _write_jsonl(directory / folder / f"{eval_split}.jsonl", evaluated)
            if train_split:
                train = eval_rows(task, 5 if task == "mmlu" else n_train, rng, train_split, subject)
                if task in ("hellaswag", "winogrande"):
                    train.insert(3, evaluated[0])
                _write_jsonl(directory / folder / f"{train_split}.jsonl", train)
    return directory


# Our task -> lm-eval's own YAML for it (under lm_eval/tasks), and the shots the leaderboard uses.
LM_EVAL_YAMLS = {"arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                 "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml", "winogrande": "winogrande/default.yaml",
                 "gsm8k": "gsm8k/gsm8k.yaml"}
LEADERBOARD_SHOTS = {"arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0, "winogrande": 5, "gsm8k": 5}


def write_lm_eval_tasks(directory: Path, data_dir: Path, tasks: list[str],
                        subjects: tuple[str, ...] = ()) -> list[str]:
    """lm-eval task YAMLs that include lm-eval's own definitions and read our files instead of the hub.

    Returns lm-eval's task names to run ("lf_" + ours). MMLU subjects become "lf_mmlu_SUBJECT", grouped by
    category ("lf_mmlu_stem", ...) under "lf_mmlu", each group size-weighted as lm-eval's mmlu is.
    """
    import lm_eval

    from llamaforge.eval.data import DataSource
    from llamaforge.eval.tasks import MMLU_CATEGORY, make_task

    builtin = Path(lm_eval.__file__).parent / "tasks"
    source = DataSource(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    entries = [(t, LM_EVAL_YAMLS[t], LEADERBOARD_SHOTS[t]) for t in tasks]
    entries += [(f"mmlu_{s}", f"mmlu/default/mmlu_{s}.yaml", 5) for s in subjects]
    for name, yaml_file, shots in entries:
        task = make_task(name)
        files = {split: str(source.split_path(task.dataset, split))
                 for split in (task.eval_split, task.fewshot_split) if split}
        file_format = "parquet" if files[task.eval_split].endswith(".parquet") else "json"
        config = {"include": str(builtin / yaml_file), "task": f"lf_{name}", "dataset_path": file_format,
                  "dataset_name": None, "dataset_kwargs": {"data_files": files}, "num_fewshot": shots, "tag": []}
        (directory / f"lf_{name}.yaml").write_text(json.dumps(config))  # JSON is YAML

    def group(name: str, members: list[str]) -> None:
        config = {"group": name, "task": members, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}
        (directory / f"{name}.yaml").write_text(json.dumps(config))

    categories = dict.fromkeys(MMLU_CATEGORY[s] for s in subjects)
    for category in categories:
        group(f"lf_mmlu_{category}", [f"lf_mmlu_{s}" for s in subjects if MMLU_CATEGORY[s] == category])
    if subjects:
        group("lf_mmlu", [f"lf_mmlu_{category}" for category in categories])
    # A group runs its members: lm-eval refuses a task named twice.
    return [f"lf_{t}" for t in tasks] + (["lf_mmlu"] if subjects else [])


def lm_eval_metrics(results: dict) -> dict[str, dict[str, float | None]]:
    """lm-eval's results in llamaforge's names: tasks without "lf_", truthfulqa's acc as mc2, gsm8k's filters."""
    renames = {"acc,none": "acc", "acc_norm,none": "acc_norm", "exact_match,strict-match": "exact_match",
               "exact_match,flexible-extract": "exact_match_flexible"}
    metrics = {}
    for task, values in results.items():
        name = task.removeprefix("lf_")
        ours = {}
        for key, value in values.items():
            base = renames.get(key.replace("_stderr,", ","))
            if base is None:
                continue
            base = "mc2" if name == "truthfulqa_mc2" else base
            ours[base + ("_stderr" if "_stderr," in key else "")] = None if value == "N/A" else float(value)
        metrics[name] = ours
    return metrics


def run_lm_eval(model_dir: Path, data_dir: Path, tasks: list[str], subjects: tuple[str, ...] = (),
                limit: int | None = None, batch_size: int = 1, work_dir: Path | None = None, dtype: str = "float32",
                device: str = "cpu", timings: dict | None = None, peft: Path | None = None,
                server: str | None = None) -> tuple[dict, dict]:
    """lm-eval 0.4's `simple_evaluate` with its HF backend on an HF model directory and our task files, offline.

    With `server` (a base URL), lm-eval's `local-completions` model scores through that server's
    /v1/completions instead (echo + logprobs), tokenizing with the model directory's HF tokenizer.

    Returns (metrics by llamaforge's task and metric names, per task the documents' request arguments and
    responses in document order). With `timings`, adds the seconds spent loading the model ("load_s") and
    answering the model requests ("requests_s", and in CPU time of this process "requests_cpu_s"). With `peft`,
    lm-eval applies that PEFT adapter to the model.
    """
    import tempfile
    import time

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    yaml_dir = Path(work_dir or tempfile.mkdtemp()) / "lm_eval_tasks"
    names = write_lm_eval_tasks(yaml_dir, data_dir, tasks, subjects)
    manager = TaskManager(include_path=str(yaml_dir), include_defaults=False)
    started = time.perf_counter()
    # The Llama 2 HF tokenizer adds BOS (its tokenizer_config says so); a bare tokenizer.model needs telling.
    if server is not None:
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        lm = LocalCompletionsAPI(base_url=f"{server}/v1/completions", model="tiny", tokenizer=str(model_dir),
                                 tokenizer_backend="huggingface", add_bos_token=True, batch_size=batch_size)
    else:
        lm = HFLM(pretrained=str(model_dir), add_bos_token=True, dtype=dtype, device=device, batch_size=batch_size,
                  peft=str(peft) if peft else None)
    spent = {"load_s": time.perf_counter() - started, "requests_s": 0.0, "requests_cpu_s": 0.0}

    def timed(method):
        def run(*args, **kwargs):
            begin, begin_cpu = time.perf_counter(), time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                spent["requests_s"] += time.perf_counter() - begin
                spent["requests_cpu_s"] += time.process_time() - begin_cpu
        return run

    lm.loglikelihood, lm.generate_until = timed(lm.loglikelihood), timed(lm.generate_until)
    output = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=True)
    if timings is not None:
        timings.update(spent)
    samples = {}
    for task, logged in output["samples"].items():
        first_filter = [s for s in logged if s["filter"] == logged[0]["filter"]]
        samples[task.removeprefix("lf_")] = [{"arguments": s["arguments"], "resps": s["resps"]}
                                             for s in sorted(first_filter, key=lambda s: s["doc_id"])]
    return lm_eval_metrics(output["results"]), samples


EVAL_CONFIG = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=128, max_seq_len=2048)


def write_eval_model(directory: Path, tokenizer: Path, max_seq_len: int = 2048, seed: int = 1) -> Path:
    """A tiny random GQA model with room for 25-shot prompts; weights mild enough that choices stay close."""
    return write_hf_dir(directory, random_model(EVAL_CONFIG.replace(max_seq_len=max_seq_len), seed=seed, std=0.08),
                        tokenizer)


def engine_tokens(llm, prompts: list[list[int]], params, max_batch_size: int, prefill_chunk: int,
                  timeout: float = 300.0) -> list[list[int]]:
    """Every prompt's generated token ids from a new running Engine (all submitted at once), in prompt order."""
    from llamaforge.engine import Engine

    engine = Engine(llm, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk).start()
    try:
        return submit_all(engine, prompts, params, timeout)
    finally:
        engine.stop()


def submit_all(engine, prompts: list[list[int]], params, timeout: float = 300.0,
               adapters: list[int] | None = None) -> list[list[int]]:
    """Every prompt's generated token ids from a running engine (all submitted at once), in prompt order; with
    `adapters`, each request's served-adapter slot."""
    import threading

    from llamaforge.engine import EngineRequest

    results: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def emitter(index: int):
        def emit(event) -> None:
            assert not isinstance(event, BaseException), event
            results[index].append(event.token_id)
            if event.finish_reason:
                done.release()
        return emit

    for index, prompt in enumerate(prompts):
        engine.submit(EngineRequest(prompt, params, emitter(index), adapter=adapters[index] if adapters else 0))
    for _ in prompts:
        assert done.acquire(timeout=timeout), "the engine did not finish every request"
    return results


def write_adapter(directory: Path, config, seed: int, rank: int, targets: tuple[str, ...]) -> Path:
    """A peft LoRA adapter for a random model of `config`, with random (trained-looking) A and B."""
    import torch

    from llamaforge.lora import LoraConfig, add_lora, lora_layers, save_adapter

    model = add_lora(random_model(config), LoraConfig(r=rank, alpha=2 * rank, dropout=0.0,
                                                      target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=generator) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.3)
    return save_adapter(model, directory)


def q4_k_bytes(weight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """`weight` (N, K), K a multiple of 256, as GGUF Q4_K blocks (N, K / 256 * 144) uint8 (bits 5: Q5_K, 176 bytes
    a block): a plain min / max choice of each 32-weight block's scale and min (llama.cpp's quantizer searches for
    better ones), in the file's layout (d, dmin float16; sc and m 6 bits each, packed in 12 bytes; Q5_K's top bits,
    bit j of byte i for sub-block j's code i; two sub-blocks' low 4 bits a run of 32 bytes)."""
    N, K = weight.shape
    top_code = 2**bits - 1
    w = weight.detach().float().reshape(N, K // 256, 8, 32)
    low = w.amin(-1).clamp(max=0)
    scales, mins = (w.amax(-1) - low) / top_code, -low  # (N, supers, 8)
    d, dmin = (scales.amax(-1) / 63).half(), (mins.amax(-1) / 63).half()  # (N, supers)

    def six_bits(values: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        factor = factor.float()[..., None]
        return torch.where(factor > 0, values / factor, 0).round().clamp(0, 63).to(torch.uint8)

    sc, m = six_bits(scales, d), six_bits(mins, dmin)
    step, offset = (d.float()[..., None] * sc)[..., None], (dmin.float()[..., None] * m)[..., None]
    q = torch.where(step > 0, (w + offset) / step, 0).round().clamp(0, top_code).to(torch.uint8)  # (N, supers, 8, 32)
    packed = torch.cat([sc[..., :4] | (sc[..., 4:] >> 4) << 6, m[..., :4] | (m[..., 4:] >> 4) << 6,
                        (sc[..., 4:] & 0x0F) | (m[..., 4:] & 0x0F) << 4], dim=-1)  # (N, supers, 12)
    runs = (q[:, :, 0::2] & 0x0F | (q[:, :, 1::2] & 0x0F) << 4).reshape(N, K // 256, 128)  # sub-blocks 2j, 2j + 1
    factors = torch.stack([d, dmin], dim=-1).view(torch.uint8)  # (N, supers, 4)
    top = ((q >> 4) << torch.arange(8, dtype=torch.uint8)[:, None]).sum(2, dtype=torch.uint8)  # (N, supers, 32)
    return torch.cat([factors, packed, *([top] if bits == 5 else []), runs], dim=-1).reshape(N, -1)


def q6_k_bytes(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (N, K), K a multiple of 256, as GGUF Q6_K blocks (N, K / 256 * 210) uint8: each 16 weights' scale
    their largest magnitude over 32 as an int8 multiple of d (a plain choice, as in q4_k_bytes), codes q - 32 in
    -32 .. 31; in Q6_K's layout (low 4 bits two a byte, top 2 bits four a byte, 16 int8 scales, d float16)."""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // 256, 16, 16)
    scales = w.abs().amax(-1) / 31  # (N, supers, 16)
    d = (scales.amax(-1) / 127).half()  # (N, supers)
    sc = torch.where(d.float()[..., None] > 0, scales / d.float()[..., None], 0).round().clamp(0, 127)
    step = (d.float()[..., None] * sc)[..., None]
    q = (torch.where(step > 0, w / step, 0).round().clamp(-32, 31) + 32).to(torch.uint8).reshape(N, K // 256, 2, 128)
    low = q[..., :64] & 0x0F | (q[..., 64:] & 0x0F) << 4  # (N, supers, half, 64)
    top = (q >> 4).reshape(N, K // 256, 2, 4, 32)
    top = top[:, :, :, 0] | top[:, :, :, 1] << 2 | top[:, :, :, 2] << 4 | top[:, :, :, 3] << 6  # (N, supers, half, 32)
    return torch.cat([low.reshape(N, -1, 128), top.reshape(N, -1, 64), sc.to(torch.int8).view(torch.uint8),
                      d[..., None].view(torch.uint8)], dim=-1).reshape(N, -1)
