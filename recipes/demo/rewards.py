"""Reward functions for `llamaforge sample --reward-function recipes/demo/rewards.py:NAME`: exact-answer checks of
the demo model's skills, worked out from the question alone (the prompt is all a reward function is given)."""

from __future__ import annotations

import re

NUMBER = re.compile(r"\d+")


def compare(messages: list[dict], answer: str) -> float:
    """1 when the answer to "Which is larger/smaller, A or B?" (any of its phrasings) is exactly the demo model's
    wording ("3 < 8, so 8 is larger."), else 0."""
    question = messages[-1]["content"].lower()
    a, b = map(int, NUMBER.findall(question))
    word = "larger" if "larger" in question or "bigger" in question else "smaller"
    pick = max(a, b) if word == "larger" else min(a, b)
    return float(answer.strip() == f"{a} {'>' if a > b else '<'} {b}, so {pick} is {word}.")
