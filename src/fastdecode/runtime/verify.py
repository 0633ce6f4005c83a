"""Verification: which drafted nodes the target model accepts, plus its own next (bonus) token.

Pure functions over a DraftTree and the target's logits for the verify rows: row 0 is the root
(the last committed token), row i + 1 is draft node i; row r predicts the token after it.
"""
from __future__ import annotations

import torch

from .tree import DraftTree


def verify_greedy(tree: DraftTree, logits: torch.Tensor, eos_ids: frozenset[int] = frozenset()) -> tuple[list[int], int]:
    """Longest root-to-leaf path whose every token is the target's argmax; returns (nodes, bonus).

    logits: [len(tree) + 1, vocab]. Nothing after an end-of-sequence token is accepted.
    """
    best = logits.argmax(-1).tolist()
    path: list[int] = []
    row = 0
    while not path or tree.tokens[path[-1]] not in eos_ids:
        parent = path[-1] if path else -1
        match = next((c for c in tree.children(parent) if tree.tokens[c] == best[row]), None)
        if match is None:
            break
        path.append(match)
        row = match + 1
    return path, best[row]
