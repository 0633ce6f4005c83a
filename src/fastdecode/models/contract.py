"""The model contract: what the decode loop, the scheduler, the drafters and the server rely on.

Every model family (models/families.py) implements it, so none of them knows which family runs.
The forward is batch-invariant: a row's logits are bitwise the same whatever other rows share its
forward (alone, in a chain, in a draft tree, beside other sequences), which is what keeps
speculative decoding token-for-token equal to plain decoding.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..runtime.kv_cache import KVCache, KVPool
from .config import ModelConfig
from .linear import Linear
from .segment import Segment


class CausalLM(Protocol):
    config: ModelConfig
    dtype: torch.dtype  # of the activations and the KV cache
    weight_format: str  # what the matrices are stored as, e.g. "Q4_1+Q8_0" (cost curves are kept per format)
    norm: torch.Tensor  # the final norm's multiplicative weight [hidden] float32 (a draft head starts from it)
    lm_head: Linear  # the output head
    # whether prompt rows are computed on another path than generated ones (then only prompt rows
    # are shared between requests by the prefix cache)
    prompt_rows_differ: bool

    def forward_batch(self, segments: Sequence[Segment], layers: Sequence[int] | None = None,
                      head: Linear | None = None) -> torch.Tensor:
        """Logits [rows, vocab] float32 of every segment's rows in order (its last row only when
        last_only); a segment that names layers in `capture` gets their output states in
        `segment.hidden` [n, k, hidden]. `layers`: run only these decoder layers (self-speculation;
        only their cache rows are written). `head`: a partial_head instead of the output head."""

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                mask: torch.Tensor | None = None, layers: Sequence[int] | None = None,
                last_logits_only: bool = False, head: Linear | None = None, capture: Sequence[int] = ()):
        """forward_batch of one segment: logits, and (logits, hidden) when `capture` names layers."""

    def new_pool(self, budget_bytes: int | None = None, rows: int = 0) -> KVPool:
        """A KV pool: `budget_bytes` of blocks, fixed; else room for `rows`, growing."""

    def new_cache(self, capacity: int) -> KVCache:
        """A cache of up to `capacity` rows in a pool of its own."""

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's first value for these tokens, [n, hidden] float32 (trained drafters)."""

    def head_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows [n, hidden] float32 of the output head (a draft head starts from them)."""

    def partial_head(self, token_ids: torch.Tensor) -> Linear:
        """An output head over only these tokens (logit j is token_ids[j]): cheaper, for drafting."""
