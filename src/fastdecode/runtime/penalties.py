"""Penalties and logit bias: OpenAI's and vLLM's adjustments of the target's logits, per position.

For the token after a context, with `out` the tokens generated so far in it (the prompt excluded)
and `seen` the prompt's tokens and `out`, the logits l become, in vLLM's order:
    l[t] += logit_bias[t]
    l[t]  = l[t] / r  if l[t] > 0 else l[t] * r          for t in seen      (repetition penalty r)
    l[t] -= frequency_penalty * count(t in out) + presence_penalty * (t in out)
before temperature and the other filters (runtime/sampling.py).

They make the target's distribution depend on the tokens before each position, so under
speculation the verifier adjusts each verify row by its own context: the committed tokens plus the
drafted path from the root to that row's node (runtime/verify.py asks for the rows it reaches, on
the accepted path only). Each adjusted row is bitwise what plain decoding computes at that position,
so every method stays exactly `ar` with the same penalties.
"""
from __future__ import annotations

from collections import Counter

import torch

from ..errors import FastDecodeError
from .sampling import SamplingParams


def has_adjustments(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
                or params.logit_bias)


def check_logit_bias(bias: dict[int, float], vocab_size: int) -> None:
    """FastDecodeError when a token id is outside the model's vocabulary."""
    bad = [t for t in bias if not 0 <= t < vocab_size]
    if bad:
        raise FastDecodeError(f"logit_bias names token {bad[0]}, outside the vocabulary (0 to {vocab_size - 1})")


class Penalties:
    """One request's adjustments: the prompt is fixed, the generated tokens are added as committed."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int):
        check_logit_bias(params.logit_bias, vocab_size)
        self.params = params
        self.prompt = frozenset(prompt)
        self.out: Counter[int] = Counter()
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            self.bias = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)

    def commit(self, tokens: list[int]) -> None:
        self.out.update(tokens)

    def apply(self, row: torch.Tensor, path: list[int] = ()) -> torch.Tensor:
        """The adjusted copy of one row of logits [vocab] whose context is the committed tokens
        followed by `path` (the drafted tokens between them and this row)."""
        p = self.params
        row = row.float().clone()
        if p.logit_bias:
            row[self.bias_ids] += self.bias
        out = self.out + Counter(path) if path else self.out
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(self.prompt | out.keys()), dtype=torch.long)
            logits = row[seen]
            row[seen] = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        if out and (p.frequency_penalty or p.presence_penalty):
            ids = torch.tensor(list(out), dtype=torch.long)
            counts = torch.tensor([out[t] for t in out], dtype=torch.float32)
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty
        return row
