"""Sampling parameters and the pure functions that turn logits into a next token.

The filters apply in the order temperature, top-k, top-p, min-p, each on what the previous left:
    p = softmax(logits / T); keep the k most likely; keep the smallest set whose mass reaches
    top_p; drop tokens below min_p * max(p); renormalise.
Temperature 0 means greedy (argmax of the raw logits).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import FastDecodeError
from .grammar import Constraint

MAX_LOGPROBS = 20  # alternatives per position, as OpenAI's top_logprobs


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # for benchmarks that need a fixed number of tokens
    # Adjustments of the logits by the context (runtime/penalties.py), before temperature.
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 is off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> [-100, 100] added to its logit
    # None: no log-probabilities; k: each token's log-probability under the model (its raw logits)
    # and the k most likely tokens' at that position.
    logprobs: int | None = None
    # Structured output: a grammar.Constraint the text must follow (JSON Schema, regex, Lark grammar).
    constraint: Constraint | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (is_number(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            (is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "seed must be an integer in [0, 2**63)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            (is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "frequency_penalty must be in [-2, 2]"),
            (is_number(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf"),
             "repetition_penalty must be a finite number > 0"),
            (isinstance(self.logit_bias, dict) and all(is_int(t) and t >= 0 and is_number(b) and -100 <= b <= 100
                                                       for t, b in self.logit_bias.items()),
             "logit_bias must map token ids (integers >= 0) to numbers in [-100, 100]"),
            (self.constraint is None or isinstance(self.constraint, Constraint),
             "constraint must be a runtime.grammar.Constraint"),
            (self.constraint is None or not self.ignore_eos,
             "ignore_eos cannot go with a constraint: once the grammar is complete, only the end may follow"),
            (self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise FastDecodeError(f"invalid sampling parameters: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def is_number(x) -> bool:
    """A real number (not a bool, not NaN)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def target_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [n, vocab] float32 -> probabilities [n, vocab] after temperature/top-k/top-p/min-p."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k and params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        # Keep a token while the mass of the more likely ones is still short of top_p.
        drop_sorted = mass_before >= params.top_p * sorted_probs.sum(-1, keepdim=True)
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [n, vocab] -> token ids [n]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [n, vocab] -> one token per row: argmax when greedy, else a sample."""
    if params.greedy:
        return logits.argmax(-1)
    return sample(target_probabilities(logits, params), generator)
