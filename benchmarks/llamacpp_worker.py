"""llama.cpp's side of benchmarks/decode.py, run by the Python of a venv that has llama-cpp-python.

llama-cpp-python lives in its own venv (`../shared/tools/llamacpp-venv.sh DIR` builds one), so decode.py starts
this script there and talks to it in JSON lines on stdin / stdout, one request and one answer per line:

    {"op": "quantize", "source": "f16.gguf", "out": "q4_0.gguf", "kind": "q4_0"}   llama.cpp's own quantizer
    {"op": "load", "path": "model.gguf", "threads": 2, "context": 512}
    {"op": "run", "prompt": [1, 2, ...], "new_tokens": 32}  -> prefill_s, decode_s_per_token, tokens
    {"op": "nll", "tokens": [1, 2, ...], "scored": [false, true, ...]}  -> summed negative log-likelihood of the
        scored tokens (load with logits_all)

A run is greedy, from an empty KV cache (no prefix reuse), timed like llamaforge's: prefill is the time to the
first new token, decode the time from the first to the last new token per later token.
Only the standard library and llama_cpp are imported: this file runs outside llamaforge's venv.
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp
import numpy as np

FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
          "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M}


def quantize(source: str, out: str, kind: str, threads: int = 2) -> dict:
    """Quantize a GGUF as `llama-quantize source out KIND` does (its default choices per tensor)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(source.encode(), out.encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize returned {status}")
    return {"path": out}


class Runner:
    """One loaded model; greedy runs timed per token."""

    def __init__(self) -> None:
        self.llm = None

    def load(self, path: str, threads: int, context: int, logits_all: bool = False) -> dict:
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=context, n_threads=threads,
                                   n_threads_batch=threads, logits_all=logits_all, verbose=False)
        return {"version": llama_cpp.__version__}

    def nll(self, tokens: list[int], scored: list[bool]) -> dict:
        """Summed negative log-likelihood of the scored tokens given the tokens before each, from one evaluation."""
        self.llm.reset()
        self.llm.eval(tokens)
        logits = np.asarray(self.llm.scores[: len(tokens) - 1], dtype=np.float64)  # (T - 1, V): row i predicts i + 1
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        positions = [i for i in range(1, len(tokens)) if scored[i]]
        total = -sum(log_probs[i - 1, tokens[i]] for i in positions)
        return {"nll": float(total), "count": len(positions)}

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        self.llm.reset()  # n_tokens = 0: generate() then evaluates the whole prompt, nothing is reused
        times, tokens = [], []
        started = time.perf_counter()
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
        return {"prefill_s": times[0] - started, "decode_s_per_token": (times[-1] - times[0]) / (new_tokens - 1),
                "tokens": tokens}


def main() -> None:
    runner = Runner()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "quantize":
                answer = quantize(**request)
            elif op == "load":
                answer = runner.load(**request)
            elif op == "nll":
                answer = runner.nll(**request)
            else:
                answer = runner.run(**request)
        except Exception as exc:  # reported to decode.py, which stops with it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
