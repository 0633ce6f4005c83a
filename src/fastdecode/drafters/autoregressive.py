"""`ar`: plain autoregressive decoding, the drafter that proposes nothing (the baseline)."""
from __future__ import annotations

from ..runtime.tree import DraftTree
from .base import DecodeState, StepResult


class Autoregressive:
    name = "ar"
    summary = "plain autoregressive decoding: drafts nothing (the baseline)"
    lossless = True
    speculates = False  # the baseline: not even a grammar's forced tokens are drafted for it

    def begin(self, prompt_ids: list[int]) -> None:
        pass

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        return DraftTree()

    def observe(self, result: StepResult) -> None:
        pass
