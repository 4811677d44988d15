"""Few-shot examples drawn as lm-evaluation-harness draws them, so every prompt is the text lm-eval builds.

Reference: lm-eval's `api/samplers.py`. One `random.Random(1234)` per task serves the documents in
order, so the examples of document i depend on the draws for documents 0..i-1 too: evaluating the
first N documents gives each the examples it gets in a full run.
"""

from __future__ import annotations

import random

from llamaforge.eval.tasks import FEWSHOT_DELIMITER, TARGET_DELIMITER, Task

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


class FewshotSampler:
    """Draws a task's examples from its few-shot split: the first n rows, or n at random (seeded)."""

    def __init__(self, pool: list[dict], first_n: bool, exclude_doc: bool, seed: int = FEWSHOT_SEED) -> None:
        self.pool = pool
        self.first_n = first_n
        self.exclude_doc = exclude_doc
        self.rng = random.Random(seed)

    def sample(self, n: int, doc: dict) -> list[dict]:
        """n examples for `doc` (never `doc` itself when the task excludes it)."""
        if n == 0:
            return []
        if self.first_n:
            return self.pool[:n]
        if not self.exclude_doc:
            return self.rng.sample(self.pool, n)
        drawn = [row for row in self.rng.sample(self.pool, n + 1) if row != doc][:n]
        if len(drawn) < n:  # the pool held copies of the document; draw again from the rest
            drawn = self.rng.sample([row for row in self.pool if row != doc], n)
        return drawn


def fewshot_prefix(task: Task, examples: list[dict]) -> str:
    """The description and the worked examples that come before a document's question."""
    shots = (task.example(example) for example in examples)
    return task.description() + "".join(q + TARGET_DELIMITER + a + FEWSHOT_DELIMITER for q, a in shots)
