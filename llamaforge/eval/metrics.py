"""Per-document metrics and their aggregation, defined as lm-evaluation-harness 0.4.x defines them.

References: lm-eval's `ConfigurableTask.process_results` (acc, acc_norm), `truthfulqa/utils.py`
(mc2), `filters/extraction.py` and `metrics.exact_match_hf_evaluate` (GSM8K), `metrics.mean_stderr`
`metrics.pooled_sample_stderr` and `unweighted_mean_stderr` (standard errors of a task, of a
size-weighted group and of a plain mean of tasks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# GSM8K: the two answer extractions lm-eval reports, and what exact match ignores on both sides.
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
INVALID = "[invalid]"  # what an extraction gives when nothing matches


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy's argmax)."""
    return max(range(len(values)), key=values.__getitem__)


def accuracy(loglikelihoods: Sequence[float], gold: int) -> float:
    """1.0 when the most likely choice is the gold one."""
    return float(argmax(loglikelihoods) == gold)


def normalized_accuracy(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> float:
    """acc_norm: the same, with each log-likelihood divided by its choice's length.

    lm-eval divides by the length of the choice string in characters (its `acc_bytes` uses UTF-8
    bytes); the two agree on ASCII text, which the leaderboard's tasks are.
    """
    return float(argmax([ll / len(choice) for ll, choice in zip(loglikelihoods, choices, strict=True)]) == gold)


def mc2(loglikelihoods: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: the probability mass of the true answers, normalised over all answers."""
    # Shifting by the maximum changes nothing mathematically and keeps long answers from underflowing to 0/0.
    top = max(loglikelihoods)
    probs = [math.exp(ll - top) for ll in loglikelihoods]
    return sum(p for p, label in zip(probs, labels, strict=True) if label == 1) / sum(probs)


def extract(pattern: re.Pattern, text: str, which: int) -> str:
    """lm-eval's regex filter: the `which`-th match (its first non-empty group), stripped, or "[invalid]"."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[which]
    if isinstance(match, tuple):
        match = next((group for group in match if group), INVALID)
    return match.strip()


def exact_match(prediction: str, reference: str, ignore: Sequence[str] = GSM8K_IGNORE,
                ignore_case: bool = True) -> float:
    """1.0 when the two strings agree once the `ignore` patterns are removed from both (and case, if asked)."""
    for pattern in ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    return float(prediction == reference)


def gsm8k_scores(generated: str, answer: str) -> dict[str, float]:
    """Exact match of the strict ("#### N") and the flexible (last number) extraction against the answer."""
    return {"exact_match": exact_match(extract(GSM8K_STRICT, generated, 0), answer),
            "exact_match_flexible": exact_match(extract(GSM8K_FLEXIBLE, generated, -1), answer)}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean (sample standard deviation / sqrt(n)); None below two values."""
    if len(values) < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1)) / math.sqrt(len(values))


def weighted_mean(values: Sequence[float], sizes: Sequence[int]) -> float:
    """A group's score: its tasks' scores weighted by their number of documents."""
    return sum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes)


def unweighted_stderr(stderrs: Sequence[float | None]) -> float | None:
    """The standard error of a plain mean of task scores; None if any is None."""
    if any(s is None for s in stderrs):
        return None
    return math.sqrt(sum(s**2 for s in stderrs)) / len(stderrs)


def pooled_stderr(stderrs: Sequence[float | None], sizes: Sequence[int]) -> float | None:
    """The standard error of a size-weighted group from its tasks' (pooled variance); None if any is None."""
    if any(s is None for s in stderrs):
        return None
    variance = sum((n - 1) * s**2 * n for s, n in zip(stderrs, sizes, strict=True)) / (sum(sizes) - len(sizes))
    return math.sqrt(variance / sum(sizes))
