"""Draft trees: the shape every drafter proposes and the verifier checks (a chain is a tree).

Node i holds tokens[i]; parents[i] is an earlier node or -1 for children of the root, the last
committed token, which is not in the KV cache yet and is always row 0 of the verify forward.
Nodes are in topological order (parents[i] < i).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    # Optional [n, vocab] draft probabilities q(. | ancestors) that proposed each node (sampling).
    draft_probs: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError("tokens and parents must have the same length")
        if any(not -1 <= p < i for i, p in enumerate(self.parents)):
            raise ValueError("every parent must be -1 or an earlier node")

    @classmethod
    def chain(cls, tokens: list[int]) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of each node; children of the root have depth 1."""
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return depth

    def children(self, node: int) -> list[int]:
        """Children of `node` (-1 for the root), in order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def attention_mask(self) -> torch.Tensor:
        """Bool [n + 1, n + 1] over the verify rows (root first): row r sees itself and its ancestors."""
        n = len(self.tokens)
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            mask[i + 1] = mask[p + 1]
            mask[i + 1, i + 1] = True
        return mask

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path as a list of node indices."""
        leaves = set(range(len(self.tokens))) - set(self.parents)
        result = []
        for leaf in sorted(leaves):
            path, node = [], leaf
            while node >= 0:
                path.append(node)
                node = self.parents[node]
            result.append(path[::-1])
        return result
