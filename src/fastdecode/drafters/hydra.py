"""`hydra`: Hydra heads, Medusa's heads made sequentially dependent on the drafted path.

Head k (heads/medusa.py, HydraHeads) reads the target's last hidden state and the embeddings of
the root and the drafted tokens before the one it guesses, so every branch of the tree is drafted
conditioned on itself (Ankner et al. 2024). Each expanded node costs one small head evaluation.
"""
from __future__ import annotations

import torch

from .medusa import Medusa


class Hydra(Medusa):
    name = kind = "hydra"
    summary = "Hydra heads: Medusa heads that also read the drafted path (needs a trained head)"

    def ahead(self, k: int, hidden: torch.Tensor, path: list[int]) -> torch.Tensor:
        return self.head.ahead(k, hidden, self.model.embed_tokens(torch.tensor(path)))
