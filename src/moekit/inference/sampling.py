"""Choosing the next token: pure functions of logits, and the validated parameters they take.

The order is transformers' (``generate``'s logits processors): repetition penalty, then
temperature, top-k, top-p, min-p, then a softmax draw (or argmax when greedy). Each filter sets
the logits it removes to -inf and always keeps the most likely token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.config import check_float, check_int


@dataclass
class SamplingParams:
    """How one sequence is continued. Plain data; invalid values raise ``ValueError`` naming the field."""

    max_new_tokens: int = 256  # tokens to generate at most (finish reason "length")
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens; None = all
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2019): smallest set with probability >= top_p
    min_p: float = 0.0  # drop tokens below min_p * the top token's probability (Nguyen et al. 2024)
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019): divide seen tokens' positive logits by it
    stop_token_ids: tuple[int, ...] = ()  # finish (reason "stop") after one of these; not part of the text
    stop: tuple[str, ...] = ()  # finish when the text contains one; the text is cut right before it
    seed: int | None = None  # the sequence's own generator: same seed, same tokens; None = nondeterministic

    def __post_init__(self) -> None:
        self.stop_token_ids, self.stop = tuple(self.stop_token_ids), tuple(self.stop)
        check_int("max_new_tokens", self.max_new_tokens)
        check_float("temperature", self.temperature)
        if self.top_k is not None:
            check_int("top_k", self.top_k)
        check_float("top_p", self.top_p, 0.0, strict=True)
        if self.top_p > 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        check_float("min_p", self.min_p)
        if self.min_p >= 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        check_float("repetition_penalty", self.repetition_penalty, 0.0, strict=True)
        for i in self.stop_token_ids:
            check_int("stop_token_ids entry", i, minimum=0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits_V: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Seen token ids' logits divided by ``penalty`` when positive, multiplied when negative
    (so > 1 always makes them less likely); ``seen`` [n] int64, repeats allowed."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits_V
    score = logits_V.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits_V.scatter(0, seen, score)


def top_k_filter(logits_V: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits_V.numel():
        return logits_V
    kth = torch.topk(logits_V, k).values[-1]
    return logits_V.masked_fill(logits_V < kth, -math.inf)


def top_p_filter(logits_V: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities sum to >= p (at least one)."""
    if p >= 1.0:
        return logits_V
    sorted_logits, order = torch.sort(logits_V, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)  # ascending: the tail mass below each token
    drop = cum <= 1 - p
    drop[-1] = False  # the most likely token always stays
    return logits_V.masked_fill(drop.scatter(0, order, drop), -math.inf)


def min_p_filter(logits_V: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0.0:
        return logits_V
    probs = logits_V.softmax(-1)
    return logits_V.masked_fill(probs < min_p * probs.max(), -math.inf)


def process_logits(logits_V: torch.Tensor, params: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    """Raw logits [V] -> the fp32 logits the next token is drawn from (filtered ones at -inf)."""
    x = apply_repetition_penalty(logits_V.float(), seen, params.repetition_penalty)
    if params.greedy:
        return x
    x = x / params.temperature
    if params.top_k is not None:
        x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    return min_p_filter(x, params.min_p)


def sample_token(logits_V: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                 generator: torch.Generator | None = None) -> int:
    """One token id from raw logits [V] (on the CPU, as the generator)."""
    x = process_logits(logits_V, params, seen)
    if params.greedy:
        return int(x.argmax())
    return int(torch.multinomial(x.softmax(-1), 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


__all__ = ["SamplingParams", "apply_repetition_penalty", "top_k_filter", "top_p_filter", "min_p_filter",
           "process_logits", "sample_token", "make_generator"]
