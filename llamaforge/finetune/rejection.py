"""`llamaforge sample`: rejection sampling, Llama 2-Chat's step between reward modelling and the next fine-tuning
round. Each prompt gets K sampled answers from the batched engine (seeds seed .. seed + K - 1, so a run is
reproducible), a reward scores each, and the best is kept as a chat record (`messages` ending with it, and its
`reward`): supervised data for `llamaforge finetune`. With `--pairs` it keeps the best and the worst answer of each
prompt instead, as a preference pair (`finetune --objective dpo`): on-policy pairs, the model's own answers, the way
iterative DPO rounds make them.

The reward is a Python function `module:function` or `path/to/file.py:function`, called as
`function(messages, answer) -> number` (messages: the prompt's dialog; answer: the sampled text), e.g. an
exact-answer check, or a reward model (`finetune.reward.RewardModelScorer`). One that raises, or returns
something other than a finite number, stops the run with an error naming the function and the prompt's line.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from llamaforge.api import LLM
from llamaforge.chat import validate_dialog
from llamaforge.engine import Engine, EngineRequest
from llamaforge.errors import ChatFormatError, LlamaforgeError
from llamaforge.finetune.data import DataError, Record, load_records
from llamaforge.sampling import SamplingParams

Reward = Callable[[list[dict], str], float]


class RewardError(LlamaforgeError):
    """A reward function that cannot be loaded or gives no usable score."""


def load_reward_function(spec: str) -> Reward:
    """The function named by `module:function` or `file.py:function`; RewardError naming what is missing."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise RewardError(f"--reward-function {spec!r}: give it as module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise RewardError(f"--reward-function {spec!r}: {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except RewardError:
        raise
    except Exception as exc:  # the module's own import errors, whatever they are
        raise RewardError(f"--reward-function {spec!r}: importing {module_name} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"--reward-function {spec!r}: {module_name} has no function {name!r}")
    function.spec = spec
    return function


def prompt_of(record: Record) -> list[dict]:
    """A record's prompt as messages ending with the user's turn: `prompt` (a string or messages) or `messages`."""
    data = record.data
    value = data.get("prompt", data.get("messages")) if isinstance(data, dict) else None
    if value is None:
        raise DataError(f"{record.where}: a prompt record needs 'prompt' (a string or messages) or 'messages'")
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    try:
        validate_dialog(messages)
    except ChatFormatError as exc:
        raise DataError(f"{record.where}: {exc}") from None
    return list(messages)


def score(reward: Reward, messages: list[dict], answer: str, where: str) -> float:
    """reward(messages, answer) as a finite float; RewardError naming the function and the prompt's place."""
    spec = getattr(reward, "spec", getattr(reward, "__name__", repr(reward)))
    try:
        value = reward(messages, answer)
    except Exception as exc:  # the user's function may raise anything; its name and type say what
        raise RewardError(f"the reward function {spec} raised {type(exc).__name__}: {exc} (prompt at {where})") \
            from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RewardError(f"the reward function {spec} returned {value!r} for the prompt at {where}; it must "
                          "return a finite number")
    return float(value)


@dataclass
class Scored:
    """One prompt's sampled answers and their rewards, in seed order."""

    where: str
    messages: list[dict]
    answers: list[str]
    rewards: list[float]

    def best(self) -> int:
        """The index of the highest-scoring answer; of equal scores, the first (the lowest seed)."""
        return max(range(len(self.answers)), key=lambda i: self.rewards[i])

    def worst(self) -> int:
        """The index of the lowest-scoring answer; of equal scores, the first."""
        return min(range(len(self.answers)), key=lambda i: self.rewards[i])


def sample_scored(llm: LLM, source: str, n: int, reward: Reward, params: SamplingParams,
                  max_batch_size: int = 8) -> list[Scored]:
    """For each prompt of `source`, n sampled answers (seeds params.seed + i) and their rewards, in the prompts'
    order; every prompt's answers decode together in the batched engine."""
    if n < 1:
        raise LlamaforgeError(f"--n must be at least 1, got {n}")
    prompts = [(record.where, prompt_of(record)) for record in load_records(source)]
    base_seed = params.seed or 0
    engine = Engine(llm, max_batch_size=max_batch_size, max_queue=len(prompts) * n).start()
    try:
        answers = generate_all(engine, [llm.chat_tokens(messages) for _, messages in prompts], n, params, base_seed)
    finally:
        engine.stop()
    scored = []
    for (where, messages), candidates in zip(prompts, answers, strict=True):
        texts = [llm.tokenizer.decode(ids).strip() for ids in candidates]
        scored.append(Scored(where, messages, texts, [score(reward, messages, text, where) for text in texts]))
    return scored


def best_record(scored: Scored) -> dict:
    """The best answer as a chat record {"messages": prompt + [the answer], "reward": its score}."""
    top = scored.best()
    answer = {"role": "assistant", "content": scored.answers[top]}
    return {"messages": [*scored.messages, answer], "reward": scored.rewards[top]}


def preference_record(scored: Scored) -> dict | None:
    """The best and the worst answer as a preference pair in trl's conversational layout, with their scores
    (`score_chosen`, `score_rejected`, as UltraFeedback's pairs carry them); None when no answer scores below
    another (nothing to prefer) or the two are the same text."""
    top, bottom = scored.best(), scored.worst()
    chosen, rejected = scored.answers[top], scored.answers[bottom]
    if scored.rewards[top] == scored.rewards[bottom] or not chosen or not rejected or chosen == rejected:
        return None
    return {"prompt": scored.messages, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "score_chosen": scored.rewards[top], "score_rejected": scored.rewards[bottom]}


def sample_best(llm: LLM, source: str, n: int, reward: Reward, params: SamplingParams,
                max_batch_size: int = 8) -> list[dict]:
    """For each prompt of `source`, the best of n sampled answers by reward as a chat record (`best_record`)."""
    return [best_record(scored) for scored in sample_scored(llm, source, n, reward, params, max_batch_size)]


def generate_all(engine: Engine, prompts: list[list[int]], n: int, params: SamplingParams,
                 base_seed: int) -> list[list[list[int]]]:
    """Each prompt's n answers' token ids (EOS left out), all submitted to a running engine at once."""
    answers = [[[] for _ in range(n)] for _ in prompts]
    done = threading.Semaphore(0)
    failures: list[BaseException] = []

    def emitter(ids: list[int]) -> Callable:
        def emit(event) -> None:
            if isinstance(event, BaseException):
                failures.append(event)
                done.release()
                return
            if not event.eos:
                ids.append(event.token_id)
            if event.finish_reason:
                done.release()
        return emit

    for index, prompt in enumerate(prompts):
        for i in range(n):
            engine.submit(EngineRequest(prompt, replace(params, seed=base_seed + i), emitter(answers[index][i])))
    for _ in range(len(prompts) * n):
        done.acquire()
    if failures:
        raise failures[0]
    return answers
