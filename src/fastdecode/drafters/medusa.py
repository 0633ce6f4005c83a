"""`medusa`: Medusa heads draft several tokens ahead from the target's last hidden state at once.

Head k (heads/medusa.py) reads the state of the row that predicted the root (the last accepted
row, handed over by the verify forward) and guesses the token k + 1 places after the root. The
heads do not depend on the path, so one pass gives every depth's candidates; the tree grows as
trained.py describes, scored by each candidate's calibrated probability along its path.
"""
from __future__ import annotations

import torch

from ..runtime.tree import DraftTree
from .base import DecodeState, StepResult, Target
from .trained import MIN_SCORE, TrainedDrafter


class Medusa(TrainedDrafter):
    name = kind = "medusa"
    summary = "Medusa heads on the target's last hidden state, several tokens ahead in one pass (needs a trained head)"

    def __init__(self, target: Target, head: str | None = None, depth: int = 4, beam: int = 4, top_k: int = 4,
                 min_score: float = MIN_SCORE, rest: bool = True):
        super().__init__(target, head, depth, beam, top_k, min_score, rest)
        self.depth = min(self.depth, len(self.head.blocks))
        self.begin([])

    def begin(self, prompt_ids: list[int]) -> None:
        self.last_state: torch.Tensor | None = None  # [1, H]: the row that predicted the root
        self.generator = None

    def prefilled(self, start: int, hidden: torch.Tensor) -> None:
        self.last_state = hidden[-1]

    def observe(self, result: StepResult) -> None:
        self.observe_scores(result)
        if result.hidden is not None:
            self.last_state = result.hidden[-1]  # the last committed row predicted the next root

    def _ready(self) -> bool:
        return self.last_state is not None

    def _draft(self, state: DecodeState, budget: int) -> DraftTree:
        hidden = self.head.base(self.last_state.float())
        root = state.tokens[-1]
        return self.grow(self.ahead(0, hidden, [[root]])[0], self._expander(hidden, root), state.params, budget)

    def ahead(self, k: int, hidden: torch.Tensor, paths: list[list[int]]) -> torch.Tensor:
        """Logits [len(paths), draft_vocab] of head k for nodes whose paths (root first) are given:
        Medusa's heads ignore the path, so one evaluation serves them all."""
        return self.head.ahead(k, hidden)[None].expand(len(paths), -1)

    def _expander(self, hidden: torch.Tensor, root: int):
        def expand(nodes: list[int], depth: int, tokens: list[int], parents: list[int]) -> torch.Tensor:
            paths = []
            for n in nodes:
                path = []
                while n >= 0:
                    path.append(self.draft_ids[tokens[n]])
                    n = parents[n]
                paths.append([root] + path[::-1])
            return self.ahead(depth, hidden, paths)
        return expand
