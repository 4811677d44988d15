"""`llamaforge <command>`: each command is a thin function over one library call.

Every command takes `--model` (an HF directory, hub repo id, Meta directory, llama2.c .bin or GGUF; left out,
the small demo model built into the package) and `--json` for machine-readable output. User errors print
one line naming the problem and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llamaforge.errors import LlamaforgeError

if TYPE_CHECKING:
    from llamaforge.tokenizer import Tokenizer

EXIT_USER_ERROR = 2
CHAT_COMMANDS = "/system TEXT sets the system prompt, /reset clears, /exit quits"


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF directory, hub repo id, Meta directory, llama2.c .bin or .gguf file "
                        "(default: demo, the small built-in chat model)")
    parser.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json to use instead of the one found")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                        help="weights dtype (default: as stored)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _adapter_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="LoRA adapter directory or hub id (peft format), merged into the weights")


def _quantize_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=["int8", "int4", "nf4"],
                        help="store the linear layers quantized after loading: int8 or int4 for fast CPU inference "
                        "(docs/benchmarks.md), nf4 as QLoRA trains")
    parser.add_argument("--group-size", type=int, help="weights per scale for int4 (32 default, 64, 128) or int8 "
                        "(default: one scale per row)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="bfloat16 / int8 / int4 CPU models: each answer's numbers to the last bit whatever its "
                        "prompt is batched, chunked or cached with (bfloat16 prompts prefill 1.4-1.7x slower)")


def _compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="run decode steps torch.compile'd: faster tokens after a one-time compile, where the "
                        "fused CPU decode layers do not run already (float32 models, GPUs; default: off)")


def _speculate_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speculate", type=int, default=0, metavar="K",
                        help="draft up to K tokens a step (0-15; default 0, off, or 4 with --draft-model), by prompt "
                        "lookup unless --draft-model; same greedy output")
    parser.add_argument("--draft-model", help="a smaller model with the same tokenizer that drafts the tokens")


def _sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, help=f"at most this many new tokens (default: {max_new_tokens}, "
                        "or what the context has room for after the prompt, whichever is less)")
    parser.set_defaults(default_max_new_tokens=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: Meta's 0.6)")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--truncate", action="store_true",
                        help="drop the oldest prompt tokens when prompt + max-new-tokens exceed the context")


def _sampling(args: argparse.Namespace, **extra: object):
    from llamaforge.sampling import SamplingParams

    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else args.default_max_new_tokens
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop), **extra)


def _load(args: argparse.Namespace):
    from llamaforge.api import load

    return load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
                adapter=getattr(args, "adapter", None), quantize=getattr(args, "quantize", None) or "auto",
                group_size=getattr(args, "group_size", None), compile=getattr(args, "compile", False),
                speculate=getattr(args, "speculate", 0), draft_model=getattr(args, "draft_model", None),
                batch_invariant=getattr(args, "batch_invariant", False))


def _print_json(payload: dict) -> None:
    print(json.dumps(payload, ensure_ascii=False))


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise LlamaforgeError(f"--prompt-ids takes comma-separated token ids like 1,450,22, not {text!r}") from None


def _fit_default(params, args: argparse.Namespace, llm, prompt_ids: list[int]):
    """The default --max-new-tokens shrinks to the room the context leaves after the prompt (as vLLM does);
    a number the user gave is kept, so asking for more than fits is still an error."""
    room = llm.config.context_length - len(prompt_ids)
    if args.max_new_tokens is None and 1 <= room < params.max_new_tokens:
        return dataclasses.replace(params, max_new_tokens=room)
    return params


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a prompt; streams text, or prints text, token ids and timings with --json."""
    from llamaforge.generate import fit_prompt

    prompt = _prompt_ids(args.prompt_ids) if args.prompt_ids else args.prompt_text or args.prompt
    if prompt is None:
        raise LlamaforgeError('give a prompt: `llamaforge generate "Once upon a time"`, --prompt TEXT, --prompt-ids, '
                              'or - to read it from stdin')
    if prompt == "-":
        prompt = sys.stdin.read().removesuffix("\n")
    params = _sampling(args, logprobs=args.logprobs)
    llm = _load(args)
    prompt_ids = llm.encode_prompt(prompt)
    params = _fit_default(params, args, llm, prompt_ids)
    fit_prompt(prompt_ids, params.max_new_tokens, llm.config.context_length, args.truncate)  # before any echo
    if args.json:
        out = llm.generate(prompt, params=params, truncate=args.truncate)
        timings = {**out.timings, **_rates(out.timings)}
        _print_json({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                     "prompt_tokens": out.prompt_tokens, "logprobs": out.logprobs, "timings": timings})
        return
    if isinstance(prompt, str):
        print(prompt, end="", flush=True)
    for delta in llm.stream(prompt, params=params, truncate=args.truncate):
        print(delta, end="", flush=True)
    print()


def _rates(timings: dict[str, float]) -> dict[str, float]:
    """Tokens per second for prefill and decode from generate's timings."""
    rates = {}
    if timings.get("prefill_s"):
        rates["prefill_tokens_per_s"] = timings["prompt_tokens"] / timings["prefill_s"]
    if timings.get("decode_s") and timings.get("decode_steps"):
        rates["decode_tokens_per_s"] = timings["decode_steps"] / timings["decode_s"]
    return rates


def cmd_chat(args: argparse.Namespace) -> None:
    """Multi-turn chat in the terminal: /system TEXT, /reset, /exit; Ctrl-C stops the current answer."""
    llm = _load(args)
    params = _sampling(args)
    system = args.system
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive and not args.json:
        print(f"llamaforge chat: {CHAT_COMMANDS}; Ctrl-C stops an answer.")
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if line == "/system" or line.startswith("/system "):
            system = line[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'removed'}; conversation cleared)")
            continue
        if line.startswith("//"):
            line = line[1:]  # a message that itself starts with /
        elif line.startswith("/"):
            print(f"(unknown command {line.split()[0]}; {CHAT_COMMANDS}; start a message with // to send one "
                  "that begins with /)")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        answer, interrupted = _stream_answer(llm, messages, params, args)
        if interrupted:
            print("\n(stopped)")
        history = messages[1:] if system else messages
        history.append({"role": "assistant", "content": answer})


def _stream_answer(llm, messages: list[dict], params, args: argparse.Namespace) -> tuple[str, bool]:
    """Stream one answer to stdout (or print it as JSON); Ctrl-C ends it early and keeps what was said."""
    parts: list[str] = []
    started = time.perf_counter()
    try:
        params = _fit_default(params, args, llm, llm.chat_tokens(messages))
        for delta in llm.stream_chat(messages, params=params, truncate=args.truncate):
            parts.append(delta)
            if not args.json:
                print(delta, end="", flush=True)
    except KeyboardInterrupt:
        return "".join(parts), True
    except LlamaforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return "", False
    answer = "".join(parts)
    if args.json:
        _print_json({"text": answer, "seconds": time.perf_counter() - started})
    else:
        print()
    return answer, False


def cmd_template(args: argparse.Namespace) -> None:
    """Print the exact Llama 2 chat prompt of a dialog file: the text (with <s>, </s>) and the token ids."""
    from llamaforge.chat import encode_dialog, render_dialog

    messages = _read_dialog(Path(args.dialog))
    tokenizer = _tokenizer(args)
    prompt, ids = render_dialog(messages), encode_dialog(tokenizer, messages)
    if args.json:
        _print_json({"prompt": prompt, "token_ids": ids})
    else:
        print(prompt)
        print(ids)


def _read_dialog(path: Path) -> list[dict]:
    if not path.is_file():
        raise LlamaforgeError(f"dialog file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LlamaforgeError(f"dialog file {path} is not valid JSON: {exc}") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise LlamaforgeError(f"dialog file {path} must hold a list of {{role, content}} messages "
                              "(or an object with a 'messages' list)")
    return messages


def cmd_info(args: argparse.Namespace) -> None:
    """Show a checkpoint's format, config, parameter count, dtype, size in bytes and context length."""
    from llamaforge.quantize import QuantizedLinear

    llm = _load(args)
    quantized = [m for m in llm.model.modules() if isinstance(m, QuantizedLinear)]
    # Parameters as the network counts them, whether stored as floats or as int8 / int4 codes.
    params = sum(p.numel() for p in llm.model.parameters()) + sum(m.in_features * m.out_features for m in quantized)
    size = sum(p.numel() * p.element_size() for p in llm.model.parameters()) + sum(
        m.codes.nbytes + m.scales.nbytes for m in quantized)
    config = llm.config
    info = {
        "source": llm.source, "format": llm.format, "parameters": params, "dtype": str(llm.dtype).replace("torch.", ""),
        "bytes": size, "device": str(llm.device), "context_length": config.context_length,
        "trained_context": config.max_seq_len, "tokenizer": str(llm.tokenizer.path) if llm.tokenizer else None,
        "config": {k: v for k, v in vars(config).items() if k != "extra"},
    }
    if args.json:
        _print_json(info)
        return
    width = max(len(key) for key in [*info, *info["config"]]) + 1
    for key, value in info.items():
        if key != "config":
            print(f"{key:{width}} {value}")
    print("config:")
    for key, value in info["config"].items():
        print(f"  {key:{width - 2}} {value}")


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve the model over OpenAI- and TGI-compatible HTTP routes, with the web playground at /."""
    import os

    try:
        from llamaforge.server import serve
    except ImportError as exc:
        raise LlamaforgeError(f"the server needs its extra ({exc.name} is missing): pip install 'llamaforge[serve]'") \
            from None
    api_key = args.api_key or _read_api_key_file(args.api_key_file) or os.environ.get("LLAMAFORGE_API_KEY")
    _check_port_free(args.host, args.port)  # before minutes of loading, and before saying it serves
    served = dict(_served_adapters(args))
    llm = _load(args)
    if served or args.max_loras:
        llm.adapters = _adapter_stack(llm, served, args.max_loras, args.max_lora_rank)
    url = f"http://{args.host}:{args.port}/"
    if args.json:
        _print_json({"url": url, "model": llm.source, "auth": bool(api_key)})
    else:
        print(f"llamaforge: serving {llm.source} at {url} (playground at {url}, OpenAI API at {url}v1)", flush=True)
    allowed_hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None
    serve(llm, host=args.host, port=args.port, max_batch_size=args.max_batch_size, max_context=args.max_context,
          api_key=api_key, max_queue=args.max_queue, allowed_hosts=allowed_hosts,
          shutdown_timeout=args.shutdown_timeout, prefix_cache=args.prefix_cache, kv_cache_tokens=args.kv_cache_tokens)


def _served_adapters(args: argparse.Namespace) -> list[tuple[str, str]]:
    """serve's --adapter values NAME=PATH (served beside the base, chosen per request); a value without a name
    stays the one adapter merged into the weights (args.adapter)."""
    values = args.adapter or []
    merged = [v for v in values if "=" not in v]
    if len(merged) > 1:
        raise LlamaforgeError(f"--adapter PATH merges one adapter into the weights; got {len(merged)}: serve several "
                              "side by side as --adapter NAME=PATH")
    args.adapter = merged[0] if merged else None
    served = [tuple(v.split("=", 1)) for v in values if "=" in v]
    names = [name for name, _ in served]
    if any(not name or not path for name, path in served) or len(set(names)) != len(names):
        raise LlamaforgeError(f"--adapter NAME=PATH takes distinct non-empty names and paths, got {values}")
    return served


def _adapter_stack(llm, served: dict[str, str], max_loras: int | None, max_rank: int | None):
    """The adapters to serve beside the base: room for max(--max-loras, their number), ranks up to --max-lora-rank
    (default: the largest given, or 16)."""
    from llamaforge.adapters import AdapterStack
    from llamaforge.lora import read_adapter

    ranks = [tensor.shape[0] for path in served.values() for name, tensor in read_adapter(path)[1].items()
             if name.endswith(".lora_A.weight")]
    stack = AdapterStack(llm.model, max(max_loras or 0, len(served)), max_rank or max(ranks, default=16))
    for name, path in served.items():
        stack.add(name, path)
    return stack


def _check_port_free(host: str, port: int) -> None:
    """Refuse, in one line, an address another server holds (uvicorn would say "[Errno 98]" after the load)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no reason
            probe.bind((host, port))
    except OSError as exc:
        raise LlamaforgeError(f"cannot listen on {host}:{port} ({exc.strerror}); another server may hold it: "
                              "stop it or pass --port N") from None


def _read_api_key_file(path: str | None) -> str | None:
    """The key in --api-key-file (its first line), or None without the flag."""
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise LlamaforgeError(f"cannot read the API key file {path}: {exc}") from None
    if not key:
        raise LlamaforgeError(f"the API key file {path} is empty; put the key on its first line")
    return key


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune with LoRA, QLoRA or every weight, on answers or preference pairs; under torchrun the model is
    sharded with FSDP2."""
    from llamaforge.finetune.config import TrainConfig
    from llamaforge.finetune.trainer import finetune

    settings = {name: value for name, value in vars(args).items() if name not in ("command", "function", "json")}
    settings["lora_targets"] = [t for t in settings["lora_targets"].split(",") if t]
    result = finetune(TrainConfig(**settings))
    if result.interrupted:
        raise SystemExit(130)
    if args.json:
        _print_json({"out": str(result.out), "steps": result.steps, "final_train_loss": result.train_losses[-1]
                     if result.train_losses else None, "validation_loss": result.val_loss})


def cmd_score(args: argparse.Namespace) -> None:
    """Score answers with a reward model: each pair's chosen and rejected (and how often chosen wins), or each
    chat record's last answer."""
    from llamaforge.finetune.reward import load_reward_model, score_records

    model, tokenizer = load_reward_model(args.reward_model, device=args.device or "cpu")
    scored = score_records(model, tokenizer, args.data, args.batch_size)
    pairs = [row for row in scored if "chosen" in row]
    summary = {"records": len(scored), "pairs": len(pairs)}
    if pairs:
        summary["accuracy"] = sum(row["chosen"] > row["rejected"] for row in pairs) / len(pairs)
        summary["mean_margin"] = sum(row["chosen"] - row["rejected"] for row in pairs) / len(pairs)
    for row in scored:
        print(json.dumps(row) if args.json else "  ".join(f"{key} {value:.4g}" if isinstance(value, float) else
                                                           f"{value}" for key, value in row.items()))
    print(json.dumps(summary) if args.json else ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else
                                                          f"{key} {value}" for key, value in summary.items()))


def cmd_sample(args: argparse.Namespace) -> None:
    """Rejection sampling: n answers to each prompt, the best by a reward kept as chat records for finetune (or, with
    --pairs, the best and the worst as preference pairs for DPO)."""
    from llamaforge.finetune.rejection import best_record, load_reward_function, preference_record, sample_scored
    from llamaforge.finetune.reward import RewardModelScorer

    # Before the model loads: a typo costs nothing.
    reward = load_reward_function(args.reward_function) if args.reward_function else RewardModelScorer(
        args.reward_model, args.device or "cpu")
    out = Path(args.out)
    if out.exists():
        raise LlamaforgeError(f"--out {out} already exists; choose a new file")
    if args.pairs and args.n < 2:
        raise LlamaforgeError(f"--pairs needs two answers or more to compare: raise --n (got {args.n})")
    llm = _load(args)
    params = _sampling(args)
    if params.seed is None:
        params = dataclasses.replace(params, seed=0)
    scored = sample_scored(llm, args.prompts, args.n, reward, params, args.max_batch_size)
    records = [preference_record(one) for one in scored] if args.pairs else [best_record(one) for one in scored]
    records = [record for record in records if record is not None]
    partial = out.with_name(out.name + ".partial")  # renamed when whole: no half-written file under --out
    partial.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    partial.replace(out)
    rewards = [reward for one in scored for reward in one.rewards]
    summary = {"out": str(out), "prompts": len(scored), "answers": len(rewards),
               "mean_reward": sum(rewards) / len(rewards),
               "mean_best_reward": sum(max(one.rewards) for one in scored) / len(scored)}
    if args.pairs:
        summary["pairs"] = len(records)
    if args.json:
        _print_json(summary)
    elif args.pairs:
        print(f"wrote {out}: {len(records)} preference pairs (best and worst of {args.n} answers) from "
              f"{len(scored)} prompts; the other {len(scored) - len(records)} scored all their answers alike. "
              f"Mean reward {summary['mean_reward']:.4g}, of the best {summary['mean_best_reward']:.4g}")
    else:
        print(f"wrote {out}: the best of {args.n} answers to {len(scored)} prompts, mean reward "
              f"{summary['mean_best_reward']:.4g} (of all answers {summary['mean_reward']:.4g})")


def cmd_merge(args: argparse.Namespace) -> None:
    """Fold a LoRA adapter into its base model and write a full HF-format model."""
    from llamaforge.api import load
    from llamaforge.chat import JINJA_TEMPLATE
    from llamaforge.checkpoint.hf import save_hf_dir

    if not args.adapter:
        raise LlamaforgeError("merge needs --adapter DIR (the adapter to fold into --model)")
    llm = load(args.model, dtype=args.dtype, device=args.device or "cpu", tokenizer=args.tokenizer,
               adapter=args.adapter)
    out = save_hf_dir(llm.model.state_dict(), llm.config, args.out, llm.tokenizer, chat_template=JINJA_TEMPLATE)
    if args.json:
        _print_json({"out": str(out)})
    else:
        print(f"wrote {out} ({llm.source} + {args.adapter})")


def cmd_data_check(args: argparse.Namespace) -> None:
    """Lint a training file: schema, problems with line numbers, token lengths, the loss mask of one example."""
    from llamaforge.finetune.inspect import check_data

    report = check_data(args.file, _tokenizer(args), args.seq_len)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.render())
    if not report.ok:
        raise SystemExit(1)


def cmd_export(args: argparse.Namespace) -> None:
    """Write the model (with --adapter merged in) as one GGUF file that llama.cpp runs."""
    from llamaforge.api import load
    from llamaforge.chat import JINJA_TEMPLATE
    from llamaforge.checkpoint.gguf import WEIGHT_TYPES, write_gguf
    from llamaforge.quantize import dense_state_dict

    out = Path(args.out)
    # Checked before the weights load: a typo should not cost a 7B load.
    if out.suffix != ".gguf" or out.exists():
        raise LlamaforgeError(f"--out {out}: give a new file name ending in .gguf")
    if args.type not in WEIGHT_TYPES:
        raise LlamaforgeError(f"--type {args.type}: choose one of {', '.join(WEIGHT_TYPES)}")
    # Dense weights (a quantized GGUF's dequantized, a quantized folder's below), stored in the type asked.
    llm = load(args.model, dtype=args.dtype, device=args.device or "cpu", tokenizer=args.tokenizer,
               adapter=args.adapter, quantize=None)
    if llm.tokenizer is None:
        raise LlamaforgeError(f"{llm.source} has no tokenizer, and a GGUF file carries one: pass --tokenizer "
                              "tokenizer.model")
    # The Llama 2 chat format as a Jinja template, so llama.cpp's chat endpoint formats dialogs as llamaforge does.
    write_gguf(dense_state_dict(llm.model), llm.config, llm.tokenizer, out, args.type,
               name=Path(str(llm.source)).name, chat_template=JINJA_TEMPLATE)
    if args.json:
        _print_json({"out": str(out), "type": args.type, "bytes": out.stat().st_size})
    else:
        print(f"wrote {out} ({args.type}, {out.stat().st_size / 2**20:.1f} MiB)")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Write an int8 / int4 copy of a model (an HF folder) that loads quantized, without quantizing again."""
    from llamaforge.api import load
    from llamaforge.chat import JINJA_TEMPLATE
    from llamaforge.checkpoint.hf import save_hf_dir
    from llamaforge.checkpoint.quantized import quantization_config

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # checked before a 7B load, not after
        raise LlamaforgeError(f"--out {out} already exists; give a new directory")
    llm = load(args.model, dtype=args.dtype, device="cpu", tokenizer=args.tokenizer, adapter=args.adapter,
               quantize=args.type, group_size=args.group_size)
    save_hf_dir(llm.model.state_dict(), llm.config, out, llm.tokenizer, chat_template=JINJA_TEMPLATE,
                quantization=quantization_config(llm.model, args.type))
    size = sum(f.stat().st_size for f in out.iterdir())
    if args.json:
        _print_json({"out": str(out), "type": args.type, "group_size": args.group_size, "bytes": size})
    else:
        print(f"wrote {out} ({args.type}, {size / 2**20:.1f} MiB); load it with --model {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    """Score ARC, HellaSwag, MMLU, TruthfulQA, Winogrande and GSM8K exactly as lm-evaluation-harness does."""
    if args.compare:
        _compare_reports(args)
        return
    from llamaforge.checkpoint import DEMO
    from llamaforge.eval.data import DataSource
    from llamaforge.eval.evaluator import evaluate, prepare, run_config
    from llamaforge.eval.report import markdown, write_report
    from llamaforge.eval.tasks import resolve

    if args.limit is not None and args.limit < 1:
        raise LlamaforgeError(f"--limit must be at least 1 (documents per task), got {args.limit}")
    if args.batch_size < 1 or (args.num_fewshot is not None and args.num_fewshot < 0):
        raise LlamaforgeError("--batch-size must be at least 1 and --num-fewshot at least 0")
    if args.tasks is None and args.preset is None and (args.model or DEMO) == DEMO:
        args.tasks = "demo"  # the built-in model's own skills: something real to run with nothing downloaded
    names = resolve(args.tasks, args.preset)
    source = DataSource(args.data_dir)
    # Data and prompts are checked before the weights load: a missing file should not cost a 7B load.
    runs = prepare(names, source, args.num_fewshot, args.limit)
    llm = _load(args)
    model = {"source": llm.source, "adapter": args.adapter, "dtype": str(llm.dtype).replace("torch.", ""),
             "device": str(llm.device)}
    report = {"tasks": names, "model": model,
              "config": run_config(source, args.num_fewshot, args.limit, args.batch_size),
              **evaluate(llm, runs, args.batch_size)}  # a bar on a terminal, else plain lines
    if args.out:
        write_report(report, args.out)
    if args.json:
        _print_json(report)
        return
    print(markdown(report))
    if args.out:
        print(f"wrote {args.out}")


def _compare_reports(args: argparse.Namespace) -> None:
    """Print the deltas between two results files and draw both as a bar chart."""
    from llamaforge.eval.report import compare, compare_markdown, plot_comparison, read_report

    first, second = (Path(p) for p in args.compare)
    deltas = compare(read_report(first), read_report(second))
    name_a, name_b = (first.stem, second.stem) if first.stem != second.stem else (str(first), str(second))
    plot = plot_comparison(deltas, name_a, name_b, args.plot or second.with_name(f"{first.stem}_vs_{second.stem}.png"))
    if args.json:
        _print_json({"deltas": [{"task": d.label.strip(), "metric": d.metric, "a": d.a, "b": d.b, "delta": d.delta}
                                for d in deltas], "plot": str(plot)})
        return
    print(compare_markdown(deltas, name_a, name_b))
    print(f"wrote {plot}")


def cmd_perplexity(args: argparse.Namespace) -> None:
    """Perplexity and bits per byte of a text file, sliding window with stride (e.g. to check a quantized model)."""
    from llamaforge.eval.perplexity import perplexity

    path = Path(args.file)
    if not path.is_file():
        raise LlamaforgeError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LlamaforgeError(f"{path} is not UTF-8 text ({exc})") from None
    llm = _load(args)
    result = perplexity(llm, text, args.context, args.stride, args.batch_size, progress=sys.stderr.isatty())
    if args.json:
        _print_json({"file": str(path), **result.to_dict()})
        return
    print(f"perplexity {result.perplexity:.4f}  bits per byte {result.bits_per_byte:.4f}  ({result.tokens} tokens, "
          f"{result.bytes} bytes, {_count(result.windows, 'window')} of {result.context} tokens every {result.stride}, "
          f"{result.seconds:.1f} s)")


def _count(n: int, noun: str) -> str:
    """'1 window', '3 windows'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _tokenizer(args: argparse.Namespace) -> Tokenizer:
    """--tokenizer, or the tokenizer of --model (read without loading weights; default the demo model)."""
    from llamaforge.checkpoint import DEMO, detect_format, read_tokenizer, resolve
    from llamaforge.tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer(args.tokenizer)
    model_path = resolve(args.model or DEMO)
    tokenizer = read_tokenizer(model_path, detect_format(model_path))
    if tokenizer is None:
        raise LlamaforgeError(f"{args.model} has no tokenizer file; pass --tokenizer tokenizer.model")
    return tokenizer


def _finetune_flags(parser: argparse.ArgumentParser) -> None:
    from llamaforge.config import LINEAR_LAYERS
    from llamaforge.finetune.config import (
        METHODS,
        OBJECTIVES,
        ON_LONG,
        PRECISIONS,
        PREFERENCE_LOSSES,
        SCHEDULES,
        TrainConfig,
    )

    defaults = TrainConfig.__dataclass_fields__

    def default(name: str):
        return defaults[name].default

    parser.add_argument("--model", help="base model: HF directory, hub id, Meta directory or llama2.c .bin "
                        "(default: demo, the small built-in chat model)")
    parser.add_argument("--init", help="train a new model from random weights: a preset (tiny, 7B ...) or "
                        "config.json; needs --tokenizer and --method full")
    parser.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json (default: the model's)")
    parser.add_argument("--data", required=True, help=".jsonl/.json/.csv/.parquet file, or a datasets id")
    parser.add_argument("--out", required=True, help="output directory (adapter, or model/ for --method full)")
    parser.add_argument("--method", choices=METHODS, default=default("method"))
    parser.add_argument("--objective", choices=OBJECTIVES, default=default("objective"),
                        help="sft: learn the answers in --data; dpo: learn from preference pairs (prompt, chosen, "
                        "rejected) against the model as it was before; reward: a reward model from the pairs")
    parser.add_argument("--loss-type", choices=PREFERENCE_LOSSES, default=default("loss_type"),
                        help="dpo's loss: sigmoid (DPO), ipo or robust (robust DPO)")
    parser.add_argument("--beta", type=float, default=default("beta"),
                        help="dpo: how far from the reference model the policy may move (higher: less far)")
    parser.add_argument("--label-smoothing", type=float, default=default("label_smoothing"),
                        help="dpo: the share of pairs assumed mislabelled (sigmoid: conservative DPO; robust)")
    parser.add_argument("--rpo-alpha", type=float, default=default("rpo_alpha"),
                        help="dpo: add this times the chosen answers' negative log-likelihood per token (RPO; keeps "
                        "DPO from lowering the chosen answers too; 1.0 is the paper's; default 0: off)")
    parser.add_argument("--seq-len", type=int, default=default("seq_len"), help="tokens per training row")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                        help="pack short examples into --seq-len rows, or one per row (default: pack when the packed "
                        "rows still make 20 optimizer steps an epoch)")
    parser.add_argument("--on-long", choices=ON_LONG, default=default("on_long"),
                        help="examples longer than --seq-len: truncate, drop, or stop with an error")
    parser.add_argument("--val-fraction", type=float, help="records held out for validation (default: 0.05 when "
                        "that is 10 records or more, else none)")
    parser.add_argument("--epochs", type=float, help="passes over the data (default: 1; for small data enough to show "
                        "the model 4,000 examples, at most 150 epochs)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=default("batch_size"), help="rows per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=default("grad_accum"), help="micro-batches per step")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4 for LoRA/QLoRA, 2e-5 full, "
                        "times 4096/width, at most 10x, for models narrower than Llama 2 7B)")
    parser.add_argument("--weight-decay", type=float, default=default("weight_decay"))
    parser.add_argument("--warmup-ratio", type=float, default=default("warmup_ratio"),
                        help="warm-up steps as a fraction of the run's, rounded down")
    parser.add_argument("--schedule", choices=SCHEDULES, default=default("schedule"))
    parser.add_argument("--clip", type=float, default=default("clip"), help="max gradient norm (0 = off)")
    parser.add_argument("--seed", type=int, default=default("seed"))
    parser.add_argument("--precision", choices=PRECISIONS, default=default("precision"),
                        help="auto: bf16 autocast on CUDA GPUs that support it, else fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in backward: less memory, ~30%% more compute")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile each decoder layer (default: on CUDA, off on CPU)")
    parser.add_argument("--lora-r", type=int, default=default("lora_r"))
    parser.add_argument("--lora-alpha", type=float, default=default("lora_alpha"))
    parser.add_argument("--lora-dropout", type=float, default=default("lora_dropout"))
    parser.add_argument("--lora-targets", default=",".join(LINEAR_LAYERS),
                        help="comma-separated module names (or all-linear)")
    parser.add_argument("--save-every", type=int, default=default("save_every"), help="checkpoint every N steps")
    parser.add_argument("--keep-checkpoints", type=int, default=default("keep_checkpoints"))
    parser.add_argument("--eval-every", type=int, default=default("eval_every"),
                        help="validation loss every N steps (0 = at the end only)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", help="cpu, cuda ... (under torchrun: one GPU per process)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaforge", description="Test, prompt, fine-tune, deploy and "
                                     "benchmark Llama 2 models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, function: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=function.__doc__, description=function.__doc__)
        sub.set_defaults(function=function)
        return sub

    generate = add("generate", cmd_generate)
    generate.add_argument("prompt", nargs="?", help="text to continue (BOS is added); - reads it from stdin")
    generate.add_argument("--prompt", dest="prompt_text", help="the same, as a flag")
    generate.add_argument("--prompt-ids", help="comma-separated token ids, used exactly as given")
    generate.add_argument("--logprobs", action="store_true", help="report each token's log-probability (--json)")
    _model_flags(generate)
    _adapter_flag(generate)
    _quantize_flag(generate)
    _compile_flag(generate)
    _speculate_flag(generate)
    _sampling_flags(generate, max_new_tokens=128)

    chat = add("chat", cmd_chat)
    chat.add_argument("--system", help="system prompt")
    _model_flags(chat)
    _adapter_flag(chat)
    _quantize_flag(chat)
    _compile_flag(chat)
    _speculate_flag(chat)
    _sampling_flags(chat, max_new_tokens=512)

    template = add("template", cmd_template)
    template.add_argument("--dialog", required=True, help="JSON file: a list of {role, content} messages")
    _model_flags(template)

    info = add("info", cmd_info)
    _model_flags(info)

    serve = add("serve", cmd_serve)
    _model_flags(serve)
    serve.add_argument("--adapter", action="append", metavar="[NAME=]PATH",
                       help="LoRA adapter (peft directory or hub id): NAME=PATH serves it beside the base as model "
                            "NAME (repeatable; requests pick it by `model` or TGI's adapter_id); a bare PATH is merged "
                            "into the weights")
    serve.add_argument("--max-loras", type=int, help="adapter slots, for loading more at run time with POST "
                                                     "/v1/load_lora_adapter (default: the --adapter NAME=PATH count)")
    serve.add_argument("--max-lora-rank", type=int,
                       help="largest adapter rank served (default: the largest given, or 16)")
    _quantize_flag(serve)
    _compile_flag(serve)
    _speculate_flag(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together")
    serve.add_argument("--max-context", type=int, help="tokens a sequence may reach, prompt and answer (default: the "
                                                       "model's context)")
    serve.add_argument("--kv-cache-tokens", type=int, help="the KV cache's size in tokens, in blocks of 16 shared by "
                                                           "all sequences and the prefix cache (default: "
                                                           "max-batch-size x max-context)")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 503")
    serve.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                       help="recompute every prompt whole (default: reuse the keys and values of a prompt's start "
                            "that the KV cache still holds: a chat's history, a shared system prompt)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (visible in `ps`: prefer "
                                         "--api-key-file or $LLAMAFORGE_API_KEY)")
    serve.add_argument("--api-key-file", help="read the API key from this file")
    serve.add_argument("--allowed-hosts", help="comma-separated Host names to answer, '*' for any (default: "
                                               "loopback names when bound to loopback, else any)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds running answers get to finish on Ctrl-C / SIGTERM (default 30)")

    _finetune_flags(add("finetune", cmd_finetune))

    score = add("score", cmd_score)
    score.add_argument("--reward-model", required=True, help="a reward model folder (finetune --objective reward: "
                       "model/ of a full run, or a LoRA run's adapter folder; or transformers' "
                       "LlamaForSequenceClassification with one label)")
    score.add_argument("--data", required=True, help="preference pairs (both answers scored), or chat records "
                       "ending with the answer to score")
    score.add_argument("--device", help="cpu, cuda ...")
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--json", action="store_true", help="one JSON line per record, then the summary")

    sample = add("sample", cmd_sample)
    sample.add_argument("--prompts", required=True, help="prompts: .jsonl/.json/.csv/.parquet or a datasets id, "
                        "each with 'prompt' (text or messages) or 'messages' ending with the user's turn")
    sample.add_argument("--n", type=int, default=4, help="answers sampled per prompt (seeds --seed .. --seed + n - 1)")
    rewards = sample.add_mutually_exclusive_group(required=True)
    rewards.add_argument("--reward-function",
                         help="module:function or file.py:function, called as function(messages, answer) -> number")
    rewards.add_argument("--reward-model", help="a reward model folder (finetune --objective reward)")
    sample.add_argument("--out", required=True, help="JSONL file for the best answers (chat records with 'reward')")
    sample.add_argument("--pairs", action="store_true", help="write preference pairs instead: each prompt's best "
                        "answer as chosen and its worst as rejected (prompts whose answers all score alike are left "
                        "out), for finetune --objective dpo")
    sample.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together")
    _model_flags(sample)
    _adapter_flag(sample)
    _sampling_flags(sample, max_new_tokens=256)

    merge = add("merge", cmd_merge)
    _model_flags(merge)
    _adapter_flag(merge)
    merge.add_argument("--out", required=True, help="directory for the merged HF-format model")

    export = add("export", cmd_export)
    _model_flags(export)
    _adapter_flag(export)
    export.add_argument("--out", required=True, help="the .gguf file to write")
    export.add_argument("--type", default="f16", help="how the weights are stored: f32, f16 (default), bf16, q8_0 "
                        "or q4_0 (output.weight then q8_0, as llamaforge's int4 keeps it); norms stay f32")

    quantize = add("quantize", cmd_quantize)
    _model_flags(quantize)
    _adapter_flag(quantize)
    quantize.add_argument("--out", required=True, help="directory for the quantized model")
    quantize.add_argument("--type", required=True, choices=["int8", "int4"], help="int8 (one scale per row unless "
                          "--group-size) or int4 (groups of 32 unless --group-size)")
    quantize.add_argument("--group-size", type=int, help="weights per scale: 32, 64 or 128")

    evaluation = add("eval", cmd_eval)
    _model_flags(evaluation)
    _adapter_flag(evaluation)
    _quantize_flag(evaluation)
    evaluation.add_argument("--tasks", help="comma-separated: arc_challenge, hellaswag, mmlu, truthfulqa_mc2, "
                            "winogrande, gsm8k; also mmlu_<category> and mmlu_<subject>; demo (the built-in "
                            "model's skills, the default for it) and demo_<skill>")
    evaluation.add_argument("--preset", help="leaderboard: the Open LLM Leaderboard's six tasks (the task list when "
                            "--tasks is not given)")
    evaluation.add_argument("--num-fewshot", type=int, help="examples in every prompt (default: each task's "
                            "leaderboard count; TruthfulQA stays 0-shot, as in lm-eval)")
    evaluation.add_argument("--data-dir", help="local task files in the hub datasets' schemas (layout: docs/eval.md); "
                            "default: download them through datasets")
    evaluation.add_argument("--limit", type=int, help="only the first N documents of each task (each MMLU subject)")
    evaluation.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    evaluation.add_argument("--out", help="write the results as JSON to this file")
    evaluation.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                            help="instead of evaluating: print the deltas of two results files and draw a bar chart")
    evaluation.add_argument("--plot", help="the --compare chart's PNG (default: A_vs_B.png beside B.json)")

    ppl = add("perplexity", cmd_perplexity)
    ppl.add_argument("file", help="UTF-8 text file")
    _model_flags(ppl)
    _adapter_flag(ppl)
    _quantize_flag(ppl)
    ppl.add_argument("--context", type=int, help="tokens per window (default: the model's context)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts, less than --context "
                     "(default: half the context)")
    ppl.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")

    data = commands.add_parser("data", help="inspect training data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    check = data_commands.add_parser("check", help=cmd_data_check.__doc__, description=cmd_data_check.__doc__)
    check.set_defaults(function=cmd_data_check)
    check.add_argument("file", help=".jsonl/.json/.csv/.parquet file, or a datasets id")
    check.add_argument("--model", help="model whose tokenizer to use")
    check.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json")
    check.add_argument("--seq-len", type=int, default=2048, help="the --seq-len you will train with")
    check.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.function(args)
    except LlamaforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
