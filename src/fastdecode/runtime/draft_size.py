"""Adaptive draft size: how much of a proposed tree to verify, for every drafter.

A drafter scores each node with its estimate of the probability that the node is accepted (its
whole path). Verifying a tree of m nodes then yields on average 1 + (sum of their scores) tokens
(the bonus token always comes) for the cost of one forward of m + 1 rows. The kept nodes are the
m best-scored ones, with m chosen to maximise

    expected tokens per second = (1 + sum of the m best scores) / cost(m + 1)

on this machine's measured cost curve (runtime/cost_curve.py). When other sequences share the forward
(continuous batching) their rows and expected tokens join both sides of the ratio, so a node pays
only if it raises the whole batch's tokens per second: drafts shrink as the batch grows.
Scores never rise along a path,
so the m best nodes always include their ancestors. Nodes the drafter marks `keep` (and their
ancestors) are verified in any case; the others are added to them by the same rule.
"""
from __future__ import annotations

from .cost_curve import CostCurve
from .tree import DraftTree


def best_nodes(tree: DraftTree, curve: CostCurve, other_rows: int = 0, other_tokens: float = 0.0) -> list[int]:
    """The nodes of the most profitable part of `tree` to verify, increasing and closed under
    parents (all of them when it has no scores). other_rows, other_tokens: rows and expected new
    tokens of the other sequences in the forward."""
    if tree.scores is None or len(tree) == 0:
        return list(range(len(tree)))
    scores: list[float] = []
    for parent, score in zip(tree.parents, tree.scores):  # enforce: a node is no likelier than its parent
        scores.append(min(max(score, 0.0), 1.0, scores[parent] if parent >= 0 else 1.0))
    forced: set[int] = set()
    for node, keep in enumerate(tree.keep or []):
        while keep and node >= 0 and node not in forced:
            forced.add(node)
            node = tree.parents[node]
    expected = other_tokens + 1.0 + sum(scores[i] for i in forced)
    # A parent precedes its children in this order.
    order = [i for i in sorted(range(len(tree)), key=lambda i: (-scores[i], i)) if i not in forced]
    rows = other_rows + len(forced) + 1
    best_size, best_rate = 0, expected / curve.cost(rows)
    for size, node in enumerate(order, start=1):
        expected += scores[node]
        rate = expected / curve.cost(rows + size)
        if rate > best_rate:
            best_size, best_rate = size, rate
    return sorted(forced | set(order[:best_size]))
