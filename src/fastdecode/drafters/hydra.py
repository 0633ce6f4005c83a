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

    def ahead(self, k: int, hidden: torch.Tensor, paths: list[list[int]]) -> torch.Tensor:
        """Logits of head k for each node, from the embeddings of its path (root first): one batch."""
        ids = torch.tensor(paths)
        embeds = self.model.embed_tokens(ids.flatten()).view(*ids.shape, -1)
        return self.head.ahead(k, hidden.expand(len(paths), -1), embeds)
