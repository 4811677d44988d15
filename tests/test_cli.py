"""The command line: help of every command, JSON outputs on a tiny model, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llamaforge
from llamaforge.cli import build_parser, main

COMMANDS = ["generate", "chat", "template", "info"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The installed entry point, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "llamaforge", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--model" in text and "--json" in text
    assert build_parser()._subparsers._group_actions[0].choices[command].description.split()[0] in text


def test_generate_json_matches_the_library(tiny_model_dir: Path) -> None:
    result = run("generate", "--model", str(tiny_model_dir), "Once upon a time", "--temperature", "0",
                 "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    expected = llamaforge.load(tiny_model_dir).generate("Once upon a time", max_new_tokens=12, temperature=0.0)
    assert payload["token_ids"] == expected.token_ids
    assert payload["text"] == expected.text
    assert payload["finish_reason"] == expected.finish_reason
    assert payload["prompt_tokens"] == expected.prompt_tokens
    assert payload["timings"]["decode_tokens_per_s"] > 0


def test_generate_streams_text(tiny_model_dir: Path) -> None:
    result = run("generate", "--model", str(tiny_model_dir), "Llamas", "--temperature", "0", "--max-new-tokens", "8")
    expected = llamaforge.load(tiny_model_dir).generate("Llamas", max_new_tokens=8, temperature=0.0).text
    assert result.stdout == "Llamas" + expected + "\n"


def test_generate_with_prompt_ids_and_logprobs(tiny_model_dir: Path) -> None:
    result = run("generate", "--model", str(tiny_model_dir), "--prompt-ids", "1,5,9", "--temperature", "0",
                 "--max-new-tokens", "4", "--logprobs", "--json")
    payload = json.loads(result.stdout)
    assert payload["prompt_tokens"] == 3 and len(payload["logprobs"]) == len(payload["token_ids"])
    assert all(value <= 0 for value in payload["logprobs"])


def test_template_prints_prompt_and_ids(tiny_model_dir: Path, tmp_path: Path) -> None:
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    (tmp_path / "dialog.json").write_text(json.dumps(dialog))
    result = run("template", "--model", str(tiny_model_dir), "--dialog", str(tmp_path / "dialog.json"), "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["prompt"] == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]"
    assert payload["token_ids"] == llamaforge.load(tiny_model_dir).chat_tokens(dialog)
    plain = run("template", "--tokenizer", str(tiny_model_dir / "tokenizer.model"), "--dialog",
                str(tmp_path / "dialog.json"))
    assert plain.stdout == payload["prompt"] + "\n" + str(payload["token_ids"]) + "\n"


def test_info_json(tiny_model_dir: Path) -> None:
    payload = json.loads(run("info", "--model", str(tiny_model_dir), "--json").stdout)
    assert payload["format"] == "hf" and payload["dtype"] == "float32"
    assert payload["parameters"] == llamaforge.load(tiny_model_dir).config.num_parameters()
    assert payload["bytes"] == 4 * payload["parameters"]
    assert payload["context_length"] == 128 and payload["config"]["n_kv_heads"] == 2
    lines = run("info", "--model", str(tiny_model_dir)).stdout.splitlines()
    assert lines[lines.index("config:") + 1].split() == ["dim", "64"]  # the config block under its heading


def test_chat_session(tiny_model_dir: Path) -> None:
    script = "Hello\n/system Be brief.\nHi\n/reset\n/exit\nnot reached\n"
    result = run("chat", "--model", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "6", "--json",
                 stdin=script)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    llm = llamaforge.load(tiny_model_dir)
    first = llm.chat([{"role": "user", "content": "Hello"}], max_new_tokens=6, temperature=0.0).text
    second = llm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                      max_new_tokens=6, temperature=0.0).text
    assert [a["text"] for a in answers] == [first, second]
    assert "system prompt set" in result.stdout and "conversation cleared" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "--prompt-ids", "1,x"], "--prompt-ids takes comma-separated token ids"),
    (["info", "--model", "/definitely/not/here"], "does not exist"),
    (["template", "--dialog", "/no/dialog.json", "--tokenizer", "x"], "dialog file /no/dialog.json does not exist"),
    (["generate", "--device", "tpu", "hi"], "device 'tpu' is not one torch knows; use cpu, cuda, cuda:N or mps"),
    (["chat", "--device", "meta"], "device 'meta': llamaforge runs on cpu, cuda or mps"),
    (["finetune", "--data", "x.jsonl", "--out", "/tmp/never", "--device", "tpu"], "device 'tpu' is not one"),
    (["generate", "--max-new-tokens", "100000", "Hi"], "max_new_tokens is 100000: 100002 tokens exceed"),
    (["generate", "--batch-invariant", "--dtype", "float32", "Hi"], "batch-invariant inference runs the bfloat16"),
])
def test_user_errors_are_one_line(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""  # no echoed prompt before it


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line() -> None:
    result = run("info", "--device", "cuda")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "this machine has no CUDA GPU that torch can use" in result.stderr and "--device cpu" in result.stderr


def test_an_adapter_given_as_the_model_points_at_adapter(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "demo"}))
    result = run("generate", "--model", str(adapter), "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"is a LoRA adapter, not a model: pass it as --adapter {adapter}" in result.stderr
    assert "its adapter_config.json says demo" in result.stderr


def test_generate_reads_the_prompt_from_stdin(tiny_model_dir: Path) -> None:
    piped = run("generate", "--model", str(tiny_model_dir), "-", "--temperature", "0", "--max-new-tokens", "8",
                "--json", stdin="Llamas hum\n")
    assert piped.returncode == 0, piped.stderr
    expected = llamaforge.load(tiny_model_dir).generate("Llamas hum", max_new_tokens=8, temperature=0.0)
    assert json.loads(piped.stdout)["token_ids"] == expected.token_ids


def test_chat_refuses_unknown_commands_and_sends_double_slash(tiny_model_dir: Path) -> None:
    result = run("chat", "--model", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "6", "--json",
                 stdin="/foo bar\n//etc\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "(unknown command /foo;" in result.stdout and "start a message with //" in result.stdout
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    expected = llamaforge.load(tiny_model_dir).chat([{"role": "user", "content": "/etc"}], max_new_tokens=6,
                                                    temperature=0.0).text
    assert [a["text"] for a in answers] == [expected]


def test_serve_refuses_a_port_in_use_before_loading() -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run("serve", "--port", str(port), "--model", "/definitely/not/here")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in result.stderr
    assert "serving" not in result.stdout


@pytest.mark.parametrize("flags", [[], ["--no-prefix-cache", "--kv-cache-tokens", "4096"]])
def test_serve_passes_the_kv_cache_choices_to_the_server(tiny_model_dir: Path, monkeypatch, flags) -> None:
    from factories import free_port

    import llamaforge.server

    calls = []
    monkeypatch.setattr(llamaforge.server, "serve", lambda llm, **options: calls.append(options))
    assert main(["serve", "--model", str(tiny_model_dir), "--port", str(free_port()), *flags]) == 0
    assert calls[0]["prefix_cache"] is (not flags)
    assert calls[0]["kv_cache_tokens"] == (4096 if flags else None)


def test_bad_sampling_value_from_cli(tiny_model_dir: Path) -> None:
    result = run("generate", "--model", str(tiny_model_dir), "hi", "--top-p", "1.5")
    assert result.returncode == 2 and "top_p must be in (0, 1]" in result.stderr


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_chat(tmp_path: Path, tiny_tokenizer_path: Path) -> None:
    """SIGINT mid-answer prints "(stopped)" and the chat goes on to the next command."""
    import signal

    from factories import random_model, write_hf_dir

    from llamaforge.config import ModelArgs

    # Big enough that 3000 tokens take many seconds, so the interrupt lands mid-answer; greedy, its
    # answer runs to the token limit (no EOS in the first 300 tokens), so the answer cannot end by itself.
    config = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=400, hidden_dim=1024, max_seq_len=4096)
    model_dir = write_hf_dir(tmp_path / "m", random_model(config, std=0.02), tiny_tokenizer_path)
    # As a terminal starts it: a shell's background job (a CI runner's, say) ignores SIGINT, and Python keeps an
    # ignored SIGINT ignored, so restore the default before the chat starts.
    chat = subprocess.Popen([sys.executable, "-m", "llamaforge", "chat", "--model", str(model_dir),
                             "--max-new-tokens", "3000", "--temperature", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chat.stdin.write("Hello\n")
    chat.stdin.flush()
    first = chat.stdout.read(1)  # the answer has started streaming (nothing else is printed before it)
    chat.send_signal(signal.SIGINT)
    chat.stdin.write("/reset\n/exit\n")
    chat.stdin.flush()
    out, err = chat.communicate(timeout=120)
    out = first + out
    assert chat.returncode == 0, err
    assert "(stopped)" in out and out.rstrip().endswith("(conversation cleared)")


def test_the_default_max_new_tokens_shrinks_to_the_room_left(tiny_model_dir: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """A 128-token context and a 120-token prompt: the default 128 new tokens become 8; an explicit 128 is refused."""
    llm = llamaforge.load(tiny_model_dir)
    ids = [1] + [5 + i % 300 for i in range(119)]
    prompt = ",".join(map(str, ids))
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt-ids", prompt, "--temperature", "0",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == llm.generate(ids, max_new_tokens=8, temperature=0.0).token_ids
    assert len(out["token_ids"]) == 8 and out["finish_reason"] == "length"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt-ids", prompt, "--max-new-tokens", "128"]) == 2
    assert "exceed the model's context of 128" in capsys.readouterr().err


def test_help_does_not_import_torch() -> None:
    """`llamaforge --help` and every command's --help stay instant: torch (2-4 s to import) loads only to work."""
    probe = ("import sys\nfrom llamaforge.cli import build_parser, main\nbuild_parser()\n"
             "try:\n    main(['finetune', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
