"""`eagle`: an EAGLE-3-style trained head drafts a dynamic tree from the target's own hidden states.

The head (heads/eagle.py) is one decoder layer over "pairs": pair t is the target's fused states
at position t (three layers: low, middle, high) with the embedding of token t + 1, and its output
predicts token t + 2. It keeps its own small KV cache over the request's pairs. Each step:

  1. catch up: the verify forward handed over the target's states of the root and the accepted
     rows (StepResult.hidden; the prompt's rows came through `prefilled`). Their pairs, each with
     the token that followed, go through the layer as one causal chain into the head's cache; the
     last output gives the distribution of the root's children.
  2. draft: a node is expanded by running its pair (its parent's output standing in for the
     target's state, as training-time test trained it, with the node's token) against the cache
     and its ancestors' pairs; the tree grows as trained.py describes (EAGLE-2's dynamic tree).
  3. the drafted pairs are forgotten (the cache rolls back to the caught-up pairs); the next step
     catches up with the target's real states of whatever was accepted.
"""
from __future__ import annotations

import torch

from ..runtime.tree import DraftTree
from .base import DecodeState, StepResult, Target
from .trained import MIN_SCORE, TrainedDrafter

GROW_ROWS = 256  # rows the head's KV cache grows by


class PairCache:
    """The head's keys and values [kv_heads, rows, d], one row per pair: rows [0, length) are the
    caught-up pairs, rows beyond are drafted pairs of the current step."""

    def __init__(self, kv_heads: int, head_dim: int):
        self.k = torch.empty(kv_heads, 0, head_dim)
        self.v = torch.empty(kv_heads, 0, head_dim)
        self.length = 0

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, kv_heads, d] of the pairs at rows [start, start + n)."""
        end = start + len(k)
        if end > self.k.shape[1]:
            grow = max(end - self.k.shape[1], GROW_ROWS)
            self.k = torch.cat([self.k, self.k.new_empty(self.k.shape[0], grow, self.k.shape[2])], 1)
            self.v = torch.cat([self.v, self.v.new_empty(self.v.shape[0], grow, self.v.shape[2])], 1)
        self.k[:, start:end], self.v[:, start:end] = k.transpose(0, 1), v.transpose(0, 1)


class Eagle(TrainedDrafter):
    name = kind = "eagle"
    summary = "EAGLE-3-style trained head on the target's hidden states, dynamic draft tree (needs a trained head)"

    def __init__(self, target: Target, head: str | None = None, depth: int = 5, beam: int = 4, top_k: int = 4,
                 min_score: float = MIN_SCORE, rest: bool = True):
        super().__init__(target, head, depth, beam, top_k, min_score, rest)
        self.begin([])

    def begin(self, prompt_ids: list[int]) -> None:
        self.cache = PairCache(self.head.kv_heads, self.head.head_dim)
        self.states: dict[int, torch.Tensor] = {}  # position -> target states [k, H], not yet fed
        self.last_output: torch.Tensor | None = None  # the head's output of the last caught-up pair
        self._last_pair: tuple | None = None  # its query and feature, until its output is needed
        self.generator = None
        self._root_position = -1

    def prefilled(self, start: int, hidden: torch.Tensor) -> None:
        for i in range(len(hidden)):
            if start + i >= self.cache.length:  # a preempted request prefills again: keep what was fed
                self.states[start + i] = hidden[i]

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        self._root_position = len(state.tokens) - 1  # where observe files the states, drafted or not
        return super().propose(state, budget)

    def _draft(self, state: DecodeState, budget: int) -> DraftTree:
        committed = self.cache.length
        outputs: dict[int, torch.Tensor] = {}  # node -> the head's output of its pair
        rows: dict[int, int] = {}  # node -> its pair's row in the cache

        def expand(nodes: list[int], depth: int, tokens: list[int], parents: list[int]) -> torch.Tensor:
            feature = torch.stack([outputs[parents[n]] if parents[n] >= 0 else self.last_output for n in nodes])
            ids = torch.tensor([self.draft_ids[tokens[n]] for n in nodes])
            positions = torch.full((len(nodes),), self._root_position - 1 + depth)
            start = committed + len(rows)
            allowed = torch.zeros(len(nodes), start + len(nodes), dtype=torch.bool)
            allowed[:, :committed] = True
            for i, n in enumerate(nodes):
                allowed[i, start + i] = True
                ancestor = parents[n]
                while ancestor >= 0:
                    allowed[i, rows[ancestor]] = True
                    ancestor = parents[ancestor]
            g = self._layer(feature, ids, positions, start, allowed)
            for i, n in enumerate(nodes):
                rows[n], outputs[n] = start + i, g[i]
            return self.head.logits(g)

        return self.grow(self.head.logits(self._root_output()), expand, state.params, budget)

    def observe(self, result: StepResult) -> None:
        self.observe_scores(result)
        if result.hidden is None:
            return
        for i, states in enumerate(result.hidden):  # the root's row, then each accepted row
            self.states[self._root_position + i] = states

    # ---- the head's layer ------------------------------------------------------------------------

    def _catch_up(self, tokens: list[int]) -> None:
        """Feed the pairs of every position whose target states arrived and whose next token is
        known into the head's cache. A pair's key and value depend on its inputs alone (one layer),
        so only the last pair's attention and MLP are needed, for the root's children: they wait
        for _root_output (after a prompt, hundreds of rows fewer)."""
        start, end = self.cache.length, len(tokens) - 1  # pairs [start, end): token t + 1 exists
        if end <= start:
            return
        missing = [t for t in range(start, end) if t not in self.states]
        if missing:
            raise RuntimeError(f"eagle: the target's states of positions {missing[:5]} never arrived")
        states = torch.stack([self.states.pop(t) for t in range(start, end)])
        feature = self.head.fuse(states.float())
        q = self._feed(feature, torch.tensor(tokens[start + 1 : end + 1]), torch.arange(start, end), start)
        self.cache.length = end
        self._last_pair = (q[-1:], feature[-1:])

    def _root_output(self) -> torch.Tensor:
        """The head's output of the last caught-up pair, which predicts the root's children."""
        if self._last_pair is not None:
            q, feature = self._last_pair
            end = self.cache.length
            self.last_output = self._attend(q, feature, end, torch.ones(1, end, dtype=torch.bool))[-1]
            self._last_pair = None
        return self.last_output

    def _layer(self, feature: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, start: int,
               allowed: torch.Tensor) -> torch.Tensor:
        """Run pairs (feature [n, H], next-token ids [n]) at cache rows [start, start + n): they attend
        to the cache rows `allowed` [n, start + n] marks. Returns the head's outputs [n, H]."""
        q = self._feed(feature, ids, positions, start)
        return self._attend(q, feature, start + len(ids), allowed)

    def _feed(self, feature: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """Write the pairs' keys and values at cache rows [start, start + n); returns their queries."""
        q, k, v = self.head.project(feature, self.model.embed_tokens(ids), positions)
        self.cache.write(start, k, v)
        return q

    def _attend(self, q: torch.Tensor, feature: torch.Tensor, end: int, allowed: torch.Tensor) -> torch.Tensor:
        """The layer's outputs [n, H] for queries q [n, heads, d] over cache rows [0, end)."""
        head = self.head
        keys, values = self.cache.k[:, :end], self.cache.v[:, :end]  # [kv_heads, end, d]
        # Each kv head's query heads as one matrix product: a few times faster than PyTorch's masked
        # scaled_dot_product_attention at these sizes (a handful of rows over a few hundred pairs).
        n, group = len(q), head.heads // head.kv_heads
        q = q.transpose(0, 1).reshape(head.kv_heads, group * n, head.head_dim)
        scores = (q @ keys.transpose(1, 2)) * head.head_dim**-0.5
        scores = scores.view(head.kv_heads, group, n, end).masked_fill(~allowed, float("-inf"))
        attended = scores.softmax(-1).view(head.kv_heads, group * n, end) @ values  # [kv_heads, group * n, d]
        attended = attended.view(head.heads, n, head.head_dim).transpose(0, 1).reshape(n, -1)
        return head.finish(feature, attended)
