"""Choosing the next token: sampling parameters and pure tensor functions over (B, V) logits.

Each row has its own temperature, top-k, top-p, penalties, logit bias and random generator, so a row's
result depends on its own request only, never on what else shares the batch. The order of logits
processing is HF `generate`'s (repetition penalty, temperature, top-k, top-p) with OpenAI's presence and
frequency penalties after the repetition penalty and its logit bias last before temperature, so that a bias
of -100 or +100 bans or forces a token whatever the penalties did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llamaforge.errors import GenerationError

# What torch.Generator.manual_seed takes: a signed or unsigned 64-bit integer.
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy; defaults are Meta's chat ones."""

    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # 1.0: off; HF's rule (divide positive logits, multiply negative)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # keep going past EOS (benchmarks that need exactly max_new_tokens)
    # OpenAI's: subtract presence_penalty once and frequency_penalty per occurrence from the logit of each token
    # generated so far (the prompt's tokens do not count, as in vLLM); add logit_bias's (token id, bias) pairs.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((token, value) for token, value in bias))
        self.validate()

    def validate(self) -> None:
        """Raise GenerationError naming the first invalid value and its allowed range."""
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"),
            (_finite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1.0 turns it off), got {self.repetition_penalty!r}"),
            (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20,
             f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop!r}"),
            (self.seed is None or (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed!r}"),
            (_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and _finite(b) and -100 <= b <= 100
                 for t, b in self.logit_bias),
             f"logit_bias maps token ids (>= 0) to biases in [-100, 100], got {dict(self.logit_bias)!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TokenHistory:
    """What the penalties look at, per row: which tokens the context holds (prompt and output, for the repetition
    penalty) and how often each was generated (presence and frequency penalties). seen (R, V) bool, counts (R, V)."""

    def __init__(self, seen: torch.Tensor, counts: torch.Tensor) -> None:
        self.seen, self.counts = seen, counts

    @classmethod
    def empty(cls, rows: int, vocab_size: int, device: torch.device | str) -> TokenHistory:
        return cls(torch.zeros(rows, vocab_size, dtype=torch.bool, device=device),
                   torch.zeros(rows, vocab_size, dtype=torch.float32, device=device))

    def rows(self, index: slice | torch.Tensor) -> TokenHistory:
        """Some rows: a view for a slice (writes reach this history), a copy for a tensor of row numbers."""
        return TokenHistory(self.seen[index], self.counts[index])

    def start(self, row: int, prompt: list[int] | None) -> None:
        """Forget the row; with `prompt`, mark its tokens seen (they are not counted as generated)."""
        self.seen[row] = False
        self.counts[row] = 0
        if prompt:
            self.seen[row, torch.tensor(prompt, device=self.seen.device)] = True

    def add(self, token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Note one generated token for each of `rows` (default every row, in order): token_ids (R,)."""
        if rows is None:
            rows = torch.arange(self.seen.shape[0], device=self.seen.device)
        self.seen[rows, token_ids] = True
        self.counts[rows, token_ids] += 1


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """Raise GenerationError if the logit bias names a token past the vocabulary."""
    outside = [token for token, _ in params.logit_bias if token >= vocab_size]
    if outside:
        raise GenerationError(f"logit_bias names token ids {outside} past the vocabulary ({vocab_size} tokens: "
                              f"0 .. {vocab_size - 1})")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request random generator: seeded for reproducibility, else from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Penalise tokens already in the context: logits (B, V), seen (B, V) bool, penalty (B,)."""
    penalty = penalty[:, None]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p nucleus to -inf; top_k (B,) 0 = off, top_p (B,)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None]
    remove = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token once the tokens ranked above it already hold top_p of the mass; the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    remove = mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def penalized(logits: torch.Tensor, params: list[SamplingParams], history: TokenHistory | None) -> torch.Tensor:
    """float32 logits (B, V) after each row's penalties and logit bias (greedy picks the argmax of these)."""
    logits = logits.float()
    device = logits.device
    if history is not None and any(p.repetition_penalty != 1.0 for p in params):
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)
        logits = apply_repetition_penalty(logits, history.seen, penalty)
    if history is not None and any(p.presence_penalty or p.frequency_penalty for p in params):
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        logits = logits - frequency * history.counts - presence * (history.counts > 0)
    if any(p.logit_bias for p in params):
        bias = torch.zeros_like(logits)
        for row, p in enumerate(params):
            check_logit_bias(p, logits.shape[-1])
            for token, value in p.logit_bias:
                bias[row, token] = value
        logits = logits + bias
    return logits


def distribution(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The probabilities (B, V) each row samples from: penalized logits after temperature, top-k and top-p."""
    device = logits.device
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    logits = logits / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        # A top-k past the vocabulary cuts nothing; clamped, it also fits the int64 tensor.
        top_k = torch.tensor([min(p.top_k, logits.shape[-1]) for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        logits = filter_top_k_top_p(logits, top_k, top_p)
    return logits.softmax(dim=-1)


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token id per row (B,) drawn from probs (B, V) with the row's generator."""
    # Gumbel-style sampling without a multinomial sync: argmax(p / q) with q ~ Exp(1) draws from p.
    noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in generators])
    return (probs / noise).argmax(dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           history: TokenHistory | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V), each row by its own params, history and generator."""
    logits = penalized(logits, params, history)
    greedy_ids = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_ids
    sampled_ids = draw(distribution(logits, params), generators)
    is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    return torch.where(is_greedy, greedy_ids, sampled_ids)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                   top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's raw distribution: chosen (B,), top-n values and ids (B, n)."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, token_ids[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (logprobs[:, :0], token_ids[:, None][:, :0])
    return chosen, top_values, top_ids
