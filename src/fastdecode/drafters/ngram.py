"""`ngram`: prompt lookup decoding, generalised to a tree of several matches.

Text often repeats itself (code edits, summaries quoting the prompt, lists). Take the longest
suffix of the context (prompt + generated) of n tokens, max_ngram >= n >= min_ngram, that occurred
earlier, and propose what followed it there. Prompt lookup decoding (Saxena 2023,
github.com/apoorvumang/prompt-lookup-decoding; `prompt_lookup_num_tokens` in Hugging Face) takes
one match; here up to max_matches earlier occurrences (longest n first, most recent first) are
merged into a trie, so different continuations become sibling branches and agreeing ones share a
path. An index from n-gram to the positions that follow it grows with each new token, so a step
costs a few dictionary look-ups instead of a scan of the context.

Scores: P(node accepted | parent accepted) is learned per (match length, depth, kind) where kind
says whether the node is its parent's only continuation, the most supported of several, or a
less supported alternative (see acceptance.py); the statistics persist across requests.
"""
from __future__ import annotations

from ..runtime.sampling import is_int, is_number
from ..runtime.tree import DraftTree
from .acceptance import AcceptanceTable, ordered_tree
from .base import DecodeState, StepResult, check_options

UNANIMOUS, LEADING, ALTERNATIVE = 0, 1, 2
PRIOR = {UNANIMOUS: 0.7, LEADING: 0.5, ALTERNATIVE: 0.2}  # guesses until statistics come in
MAX_DEPTH_KEY = 6  # deeper nodes share the statistics of depth 6


class NGramIndex:
    """Positions following each n-gram (min_n <= n <= max_n) of a growing token list."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.positions: dict[tuple[int, ...], list[int]] = {}
        self.next_end = 0  # n-grams ending before this index are in the index

    def update(self, tokens: list[int]) -> None:
        # An n-gram ending at j is indexed once its continuation tokens[j + 1] exists.
        for j in range(self.next_end, len(tokens) - 1):
            for n in range(self.min_n, min(self.max_n, j + 1) + 1):
                self.positions.setdefault(tuple(tokens[j - n + 1 : j + 1]), []).append(j + 1)
        self.next_end = max(self.next_end, len(tokens) - 1)

    def matches(self, tokens: list[int], limit: int) -> list[tuple[int, int]]:
        """Up to `limit` (n, position) pairs: earlier occurrences of the context's last n tokens and
        where their continuation starts, longest n first, then most recent first."""
        found: list[tuple[int, int]] = []
        seen: set[int] = set()  # a position matching n tokens also matches fewer
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            for pos in reversed(self.positions.get(tuple(tokens[-n:]), ())):
                if pos not in seen:
                    seen.add(pos)
                    found.append((n, pos))
                    if len(found) == limit:
                        return found
        return found


class NGram:
    name = "ngram"
    summary = "prompt lookup generalised: continuations of the longest earlier n-gram match, as a tree"
    lossless = True

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_matches: int = 8, max_depth: int = 16,
                 min_score: float = 0.02):
        check_options("ngram", [
            (lambda: is_int(min_ngram) and min_ngram >= 1, "min_ngram must be an integer >= 1"),
            (lambda: is_int(max_ngram) and max_ngram >= min_ngram, "max_ngram must be an integer >= min_ngram"),
            (lambda: is_int(max_matches) and max_matches >= 1, "max_matches must be an integer >= 1"),
            (lambda: is_int(max_depth) and max_depth >= 1, "max_depth must be an integer >= 1"),
            (lambda: is_number(min_score) and 0 <= min_score < 1, "min_score must be in [0, 1)"),
        ])
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_matches, self.max_depth, self.min_score = max_matches, max_depth, min_score
        self.stats = AcceptanceTable()  # kept across requests
        self.begin([])

    def begin(self, prompt_ids: list[int]) -> None:
        self.index = NGramIndex(self.min_ngram, self.max_ngram)
        self.index.update(prompt_ids)  # the prompt is known now: keep the first propose cheap
        self._keys: list = []

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        tokens = state.tokens
        if len(tokens) < self.index.next_end + 1:  # not the sequence indexed so far: start again
            self.begin([])
        self.index.update(tokens)
        self._keys = []
        if budget <= 0:
            return DraftTree()
        matches = self.index.matches(tokens, self.max_matches)
        if not matches:
            return DraftTree()

        # Merge the continuations into a trie; a node remembers its longest match and support.
        # A node deeper than the budget never makes the cut (its ancestors all rank before it).
        node_tokens, parents, longest, support = [], [], [], []
        child_of: dict[tuple[int, int], int] = {}
        depth_limit = min(self.max_depth, budget)
        for n, pos in matches:  # longest n first, so a node's creator has its longest match
            parent = -1
            for token in tokens[pos : pos + depth_limit]:
                node = child_of.get((parent, token))
                if node is None:
                    node = child_of[(parent, token)] = len(node_tokens)
                    node_tokens.append(token)
                    parents.append(parent)
                    longest.append(n)
                    support.append(0)
                support[node] += 1
                parent = node

        # Feature keys and scores, parents before children (trie nodes are created in that order).
        siblings: dict[int, list[int]] = {}
        for i, p in enumerate(parents):
            siblings.setdefault(p, []).append(i)
        kind = [UNANIMOUS] * len(node_tokens)
        for group in siblings.values():
            if len(group) > 1:
                group.sort(key=lambda i: (-longest[i], -support[i], i))
                kind[group[0]] = LEADING
                for i in group[1:]:
                    kind[i] = ALTERNATIVE
        keys, scores, depth = [], [], []
        for i, p in enumerate(parents):
            depth.append(1 if p < 0 else depth[p] + 1)
            key = (longest[i], min(depth[i], MAX_DEPTH_KEY), kind[i])
            prior = PRIOR[kind[i]] * (0.6 if longest[i] == 1 else 1.0)  # a single token is weak evidence
            keys.append(key)
            scores.append((1.0 if p < 0 else scores[p]) * self.stats.rate(key, prior))

        keep = [i for i, s in enumerate(scores) if s >= self.min_score]  # closed under parents
        budget = min(budget, len(keep))
        tree, order = ordered_tree(node_tokens, parents, scores, budget)
        self._keys = [keys[i] for i in order]
        return tree

    def observe(self, result: StepResult) -> None:
        if self._keys:
            self.stats.observe(result, self._keys)
