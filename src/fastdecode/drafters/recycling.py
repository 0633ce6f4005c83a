"""`recycling`: Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating
Inference of Large Language Models with Token Recycling", arXiv:2408.08696).

Every verify forward computes the target's next-token distribution for every tree node, yet only
the accepted path is used. Token Recycling keeps those "trash" predictions in an adjacency matrix
adjacency[token] = the top-K successors the target predicted after that token (its most recent
occurrence in any verified row), and drafts by walking the matrix:

    root token t ─┬─ adjacency[t, 0] ─┬─ adjacency[adjacency[t, 0], 0] ─ ...
                  │                   └─ adjacency[adjacency[t, 0], 1]
                  ├─ adjacency[t, 1] ─ ...

following a static tree template (rank paths, built once) breadth-first. No draft model, no
training; the matrix persists across requests on the drafter instance (the paper's "hot start")
and starts empty (rows of -1): an unknown token proposes nothing. Prompt tokens have no logits,
so the matrix is filled only from verified rows.

Scores: each template position keeps the observed rate at which it is accepted when its parent was
(acceptance.py: pulled towards RANK_PRIOR of its rank); a node's score is the product of these
rates along its path, so scores never increase along a path. The engine cuts the tree with them.
"""
from __future__ import annotations

import heapq

import torch

from ..runtime.sampling import is_int
from ..runtime.tree import DraftTree
from .acceptance import AcceptanceTable
from .base import DecodeState, StepResult, check_options

TOP_K = 8  # successors kept per token (columns of the adjacency matrix); the paper uses 8
# Prior probability that the rank-j successor is accepted, given its parent was: the template grows
# best-first by the product of these along a rank path, and scores start from it. 0.5 / (j+1)^2
# fits what SmolLM2-135M showed on chat prompts (rank 0: ~0.5, rank 1: ~0.1, rank 2: ~0.08,
# rank 3 and beyond: <= 0.03), which makes the template deep along top-1 successors and narrow.
RANK_PRIOR = tuple(0.5 / (j + 1) ** 2 for j in range(TOP_K))
# The paper's GPU template has 80 nodes; a CPU forward is cheap only up to ~8-32 rows, so the
# default proposal is the best 32 positions of the template (the engine cuts further by score).
MAX_TREE_SIZE = 80
DEFAULT_TREE_SIZE = 32


def build_template(size: int) -> list[tuple[int, int, float]]:
    """The `size` most likely rank paths under RANK_PRIOR, best first: (parent position or -1,
    rank, prior). Any prefix is a tree: a child is strictly less likely than its parent, and a
    rank-j node than its rank-(j-1) sibling, so both always come earlier."""
    template: list[tuple[int, int, float]] = []
    heap = [(-RANK_PRIOR[0], 0, -1, 0)]  # (-prior, tie-break counter, parent position, rank)
    counter = 1
    while heap and len(template) < size:
        neg_prior, _, parent, rank = heapq.heappop(heap)
        position = len(template)
        template.append((parent, rank, -neg_prior))
        # A node's successors become candidates: its next sibling and its own first child.
        if rank + 1 < TOP_K:
            parent_prior = 1.0 if parent < 0 else template[parent][2]
            heapq.heappush(heap, (-parent_prior * RANK_PRIOR[rank + 1], counter, parent, rank + 1))
            counter += 1
        heapq.heappush(heap, (neg_prior * RANK_PRIOR[0], counter, position, 0))
        counter += 1
    return template


TEMPLATE = build_template(MAX_TREE_SIZE)  # static shape; a tree_size option takes a prefix


class TokenRecycling:
    name = "recycling"
    summary = "Token Recycling: each token's top successors from earlier logits, along a tree template"
    lossless = True

    def __init__(self, tree_size: int = DEFAULT_TREE_SIZE):
        check_options("recycling", [
            (lambda: is_int(tree_size) and 1 <= tree_size <= MAX_TREE_SIZE,
             f"tree_size must be an integer in [1, {MAX_TREE_SIZE}], got {tree_size!r}"),
        ])
        self.template = TEMPLATE[:tree_size]
        self.adjacency: torch.Tensor | None = None  # [vocab, TOP_K] int32, -1 = unknown; made on first observe
        self.stats = AcceptanceTable()  # keyed by template position; kept across requests
        self._root: int | None = None
        self._positions: list[int] | None = None  # template position of each proposed node

    def begin(self, prompt_ids: list[int]) -> None:
        self._root = prompt_ids[-1] if prompt_ids else None
        self._positions = None

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        self._root = root = state.tokens[-1]
        self._positions = None
        if budget <= 0 or self.adjacency is None:
            return DraftTree()
        vocab = self.adjacency.shape[0]
        rows: dict[int, list[int]] = {}  # adjacency rows as Python lists, fetched once per call
        node_at: dict[int, int] = {}  # template position -> tree node
        child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node: siblings stay distinct
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        positions: list[int] = []
        for position, (parent_position, rank, _) in enumerate(self.template):
            if len(tokens) >= budget:
                break
            parent = -1 if parent_position < 0 else node_at.get(parent_position)
            if parent is None:  # its parent was unknown or a duplicate: the whole subtree goes
                continue
            previous = root if parent < 0 else tokens[parent]
            if not 0 <= previous < vocab:
                continue
            if previous not in rows:
                rows[previous] = self.adjacency[previous].tolist()
            token = rows[previous][rank]
            if token < 0 or (parent, token) in child:
                continue
            node_at[position] = child[(parent, token)] = len(tokens)
            tokens.append(token)
            parents.append(parent)
            rate = self.stats.rate(position, RANK_PRIOR[rank])
            scores.append(rate if parent < 0 else scores[parent] * rate)
            positions.append(position)
        self._positions = positions
        return DraftTree(tokens, parents, scores=scores)

    def observe(self, result: StepResult) -> None:
        tree, logits = result.tree, result.logits
        if self.adjacency is None:
            self.adjacency = torch.full((logits.shape[-1], TOP_K), -1, dtype=torch.int32)
        if self._positions is not None:
            self.stats.observe(result, self._positions)
            self._positions = None
        # Row r holds the target's prediction after the token of row r: row 0 is the root.
        row_tokens = [self._root] + [None] * len(logits[1:])
        for token, row in zip(tree.tokens, result.rows):
            if row >= 0:
                row_tokens[row] = token
        # One row per token; the rows on the accepted path (the real context) win over side branches.
        order = list(range(len(row_tokens))) + [0] + [result.rows[node] for node in result.accepted]
        latest = {row_tokens[r]: r for r in order if row_tokens[r] is not None}
        if latest:
            # topk of all rows, then pick: cheaper than copying the chosen rows of [n, vocab] first.
            top = torch.topk(logits, min(TOP_K, logits.shape[-1]), dim=-1).indices[list(latest.values())]
            self.adjacency[torch.tensor(list(latest.keys())), : top.shape[1]] = top.to(torch.int32)
        self._root = result.new_tokens[-1] if result.new_tokens else None  # the next step's root
