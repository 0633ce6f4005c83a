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
    # Optional [n, vocab]: the distribution q each node's token was drawn from, given everything the
    # drafter knew (its ancestors, its earlier siblings): exact speculative sampling. Without it, or
    # where a row is all zeros, a node counts as a point mass on its token, which is exact for
    # tokens chosen by any rule that does not look at the verifier's random draws.
    draft_probs: torch.Tensor | None = None
    # Optional: the drafter's estimate of the probability that each node is accepted (its whole
    # path from the root). Non-increasing along a path. The engine uses it to cut the tree to the
    # size that maximises expected tokens per second on this machine (runtime/draft_size.py).
    scores: list[float] | None = None
    # Optional: nodes the drafter needs verified whatever their score (with their ancestors), such
    # as lookahead's Jacobi window, whose value is the n-grams it yields for later steps.
    keep: list[bool] | None = None
    # Optional: who proposed each node, for drafters that merge others' trees (auto); else every
    # node is the drafter's own. Shown per accepted token (the server's token provenance).
    sources: list[str] | None = None
    # A lossy drafter's first `trusted` nodes, a chain from the root, accepted without verification
    # (LUD's confidence rule, drafters/lud.py). 0 for every lossless method.
    trusted: int = 0
    # Optional, for drafters with placeholder rows (Drafter.placeholders): the nodes after which a
    # chain of them hangs, -1 for the root; None hangs them after the root alone. The root comes first.
    hangs: list[int] | None = None

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError("tokens and parents must have the same length")
        for name in ("scores", "keep", "sources"):
            if getattr(self, name) is not None and len(getattr(self, name)) != len(self.tokens):
                raise ValueError(f"{name} must have one entry per node")
        if any(not -1 <= p < i for i, p in enumerate(self.parents)):
            raise ValueError("every parent must be -1 or an earlier node")
        if self.trusted and self.parents[: self.trusted] != list(range(-1, self.trusted - 1)):
            raise ValueError("trusted nodes must be a chain from the root, first in the tree")
        if self.hangs is not None and (self.hangs[:1] != [-1] or any(not 0 <= h < len(self.tokens) for h in self.hangs[1:])):
            raise ValueError("hangs must be the root (-1) first, then nodes of the tree")

    @classmethod
    def chain(cls, tokens: list[int], **fields) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), **fields)

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

    def subtree(self, nodes: list[int]) -> "DraftTree":
        """The tree restricted to `nodes` (increasing, closed under taking parents), renumbered."""
        index = {old: new for new, old in enumerate(nodes)}
        return DraftTree(
            [self.tokens[i] for i in nodes],
            [index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in nodes],
            None if self.draft_probs is None else self.draft_probs[nodes],
            None if self.scores is None else [self.scores[i] for i in nodes],
            None if self.keep is None else [self.keep[i] for i in nodes],
            None if self.sources is None else [self.sources[i] for i in nodes],
            next((i for i in range(self.trusted) if i >= len(nodes) or nodes[i] != i), self.trusted),
            None if self.hangs is None else [-1] + [index[h] for h in self.hangs[1:] if h in index],
        )

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
