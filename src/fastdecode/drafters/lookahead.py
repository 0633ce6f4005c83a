"""`lookahead`: lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding", arXiv:2402.02057; github.com/hao-ai-lab/LookaheadDecoding).

Greedy decoding is a fixed point of the Jacobi iteration y'_i = argmax p(. | context, y_1..y_{i-1});
iterating it on guessed future tokens produces trajectories whose n-grams are often real text.
Each step sends one tree through the target that holds two branches:

  * verification: up to `max_candidates` n-grams from the pool whose first token is the root,
    their other N-1 tokens as chains under the root (merged where they share a prefix);
  * lookahead: the 2-D window of N-1 levels x W columns of guesses (levels[0] is the oldest
    Jacobi iteration). As in the paper's attention mask, column i is the sequence
        levels[0][0..i], levels[1][i], ..., levels[N-2][i]
    i.e. a spine of level-0 tokens under the root with a branch of later levels hanging off
    spine node i; all W sequences share the spine, so the whole window is one subtree of
    W * (N-1) nodes. The target's argmax after the last node of column i is the new guess new[i].

observe() runs one Jacobi update: it harvests the n-grams (levels[0][i], ..., levels[N-2][i],
new[i]) into the pool and shifts the window (levels[k] <- levels[k+1], levels[N-2] <- new). As in
the paper the window is not re-aligned when tokens are accepted: its guesses are only a source of
plausible n-grams, and verification keeps the output exact. Window nodes that happen to match the
target's greedy path are accepted like any other node. The first N-2 steps fill the levels
(level 0 starts as random prompt tokens) and harvest nothing. The pool persists across requests
(bounded, least recently harvested n-grams dropped first); the window is per request.

Scores. Each node's rate of acceptance given its parent's is tracked per (branch, depth)
(acceptance.py) and multiplied along its path. Window nodes are mainly there to be harvested, and
their acceptance rate alone would get them cut by the engine's expected-tokens-per-second cut,
which would stop the Jacobi iteration for good. So each window node is scored at least its
harvest value: the pool's accepted tokens per step (a running mean) shared among the window
nodes, floored at MIN_WINDOW_SCORE, which credits the window with the tokens its n-grams win on
later steps. The `window_score` option replaces this with a fixed
score (1.0 keeps the window whole under any score-based cut). A window the engine cut anyway is
handled: only the columns whose last node was verified are updated.
"""
from __future__ import annotations

import random
from collections import OrderedDict

from ..runtime.sampling import is_int, is_number
from ..runtime.tree import DraftTree
from .acceptance import AcceptanceTable
from .base import DecodeState, StepResult, check_options

POOL_PER_TOKEN = 16  # n-grams kept per first token (the paper keeps about W per token)
POOL_MAX = 50_000  # n-grams in the whole pool; the first tokens harvested longest ago go first
POOL_PRIOR, WINDOW_PRIOR = 0.5, 0.1  # guesses of P(accepted | parent accepted) before any data
GAIN_DECAY = 0.9  # running mean of the pool's accepted tokens per step
MIN_WINDOW_SCORE = 0.02


class Lookahead:
    name = "lookahead"
    summary = "Jacobi lookahead: a window of guesses refined each step, harvested n-grams proposed"
    lossless = True

    def __init__(self, window: int = 4, ngram: int = 4, max_candidates: int = 4,
                 window_score: float | None = None, seed: int = 0):
        check_options("lookahead", [
            (lambda: is_int(window) and 1 <= window <= 32, f"window must be an integer in [1, 32], got {window!r}"),
            (lambda: is_int(ngram) and 2 <= ngram <= 16, f"ngram must be an integer in [2, 16], got {ngram!r}"),
            (lambda: is_int(max_candidates) and 0 <= max_candidates <= 32,
             f"max_candidates must be an integer in [0, 32], got {max_candidates!r}"),
            (lambda: window_score is None or (is_number(window_score) and 0 <= window_score <= 1),
             f"window_score must be None or a number in [0, 1], got {window_score!r}"),
            (lambda: is_int(seed), f"seed must be an integer, got {seed!r}"),
        ])
        self.window, self.ngram, self.max_candidates = window, ngram, max_candidates
        self.window_score, self.seed = window_score, seed
        self.pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}  # first token -> continuations
        self.pool_size = 0
        self.levels: list[list[int]] = []
        self.stats = AcceptanceTable()  # keyed by (branch, depth); kept across requests
        self.pool_gain = 0.5  # running mean of accepted pool tokens per step (optimistic start)
        self._proposal = None

    def begin(self, prompt_ids: list[int]) -> None:
        rng = random.Random(self.seed)
        self.levels = [[rng.choice(prompt_ids) for _ in range(self.window)]] if prompt_ids else []
        self._proposal = None

    # ---- proposing -------------------------------------------------------------------------------

    def candidates(self, token: int) -> list[tuple[int, ...]]:
        """Pool continuations after `token`, most recently harvested first."""
        entries = self.pool.get(token)
        return list(reversed(entries))[: self.max_candidates] if entries else []

    def columns(self) -> list[list[int]]:
        """The lookahead window as W token sequences under the root (see the module docstring)."""
        spine = self.levels[0] if self.levels else []
        return [spine[: i + 1] + [level[i] for level in self.levels[1:]] for i in range(len(spine))]

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node: the tree is a trie
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        pool_nodes: set[int] = set()
        window_nodes: set[int] = set()
        ends: list[int | None] = []  # the last node of each window column, if it fit

        def insert(sequence: list[int], role: set[int]) -> int | None:
            node = -1
            for token in sequence:
                key = (node, token)
                if key not in child:
                    if len(tokens) >= budget:
                        return None
                    child[key] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                    depths.append(1 if node < 0 else depths[node] + 1)
                node = child[key]
                role.add(node)
            return node

        for continuation in self.candidates(state.tokens[-1]):
            insert(list(continuation), pool_nodes)
        for column in self.columns():
            ends.append(insert(column, window_nodes))
        floor = self._window_floor(len(window_nodes))
        keys: list[tuple[str, int]] = []
        scores: list[float] = []
        for i, (parent, depth) in enumerate(zip(parents, depths)):
            keys.append(("pool", depth) if i in pool_nodes else ("window", depth))
            rate = self.stats.rate(keys[i], POOL_PRIOR if i in pool_nodes else WINDOW_PRIOR)
            scores.append(rate * (1.0 if parent < 0 else scores[parent]))
        scores = [max(score, floor) if i in window_nodes else score for i, score in enumerate(scores)]
        self._proposal = (keys, pool_nodes, ends)
        return DraftTree(tokens, parents, scores=scores, keep=[i in window_nodes for i in range(len(tokens))])

    def _window_floor(self, n_nodes: int) -> float:
        """The least score of a window node: its share of what the pool wins per step."""
        if self.window_score is not None:
            return float(self.window_score)
        return max(MIN_WINDOW_SCORE, min(1.0, self.pool_gain / max(1, n_nodes)))

    # ---- observing -------------------------------------------------------------------------------

    def observe(self, result: StepResult) -> None:
        proposal, self._proposal = self._proposal, None
        if proposal is None or not len(result.tree):
            return
        keys, pool_nodes, ends = proposal
        self.stats.observe(result, keys)
        gain = sum(node in pool_nodes for node in result.accepted)
        self.pool_gain = GAIN_DECAY * self.pool_gain + (1 - GAIN_DECAY) * gain
        self.jacobi_update(ends, result)

    def jacobi_update(self, ends: list[int | None], result: StepResult) -> None:
        """One Jacobi iteration of the window from the target's argmax after each column's end."""
        rows = [result.rows[end] if end is not None else -1 for end in ends]
        present = [i for i, row in enumerate(rows) if row >= 0]
        if not present:
            return
        best = result.logits[[rows[i] for i in present]].argmax(-1).tolist()
        new = list(self.levels[-1])  # a column that was cut keeps its last guess
        for i, token in zip(present, best):
            new[i] = token
        if len(self.levels) == self.ngram - 1:
            for i in present:
                self.add_ngram(tuple(level[i] for level in self.levels) + (new[i],))
            self.levels = self.levels[1:]
        self.levels.append(new)

    def add_ngram(self, ngram: tuple[int, ...]) -> None:
        first, rest = ngram[0], ngram[1:]
        entries = self.pool.pop(first, None)
        if entries is None:
            entries = OrderedDict()
        self.pool[first] = entries  # re-inserted: the dict's order is the keys' last harvest
        if rest in entries:
            entries.move_to_end(rest)
            return
        entries[rest] = None
        self.pool_size += 1
        if len(entries) > POOL_PER_TOKEN:
            entries.popitem(last=False)
            self.pool_size -= 1
        while self.pool_size > POOL_MAX:
            oldest = next(iter(self.pool))
            self.pool_size -= len(self.pool.pop(oldest))
