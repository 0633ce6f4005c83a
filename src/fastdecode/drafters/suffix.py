"""`suffix`: suffix decoding, frequency-weighted continuations from this and earlier requests.

After SuffixDecoding (Oliaro et al. 2024, arXiv:2411.04975; Arctic Inference, the `suffix` method
of vLLM), close kin of SAM-Decoding (arXiv:2411.10666) and llama.cpp's n-gram cache. A suffix trie
of bounded depth D (max_depth) holds every substring of at most D tokens of the current request
and of earlier requests (prompt + output), each node counting how often its string occurred.
The node of the context's longest suffix that has been continued before (at most max_match
tokens, leaving room for D - max_match tokens of continuation) roots the draft: expand best
first, a child's probability being count(child) / sum of its siblings' counts, keeping the
max_children most frequent children of a node. Scores are these probabilities calibrated by the
observed acceptance per (probability, support, context length) bucket, multiplied along the path.

Updates are incremental: the trie nodes of the context's suffixes (at most D - 1 of them) are
kept, and each new token extends every one by a child step. Memory: the trie has at most
max_depth * (tokens held) nodes of about 60 bytes; tokens held = the current request plus finished
requests of at most max_history_tokens tokens in all (the oldest are removed first, their counts
subtracted), so by default at most 24 * 16384 nodes (about 24 MB) plus 1.4 KB per token of the
current request. The history lives on the drafter instance, so it survives requests.
"""
from __future__ import annotations

import heapq
from collections import deque

from ..runtime.sampling import is_int, is_number
from ..runtime.tree import DraftTree
from .acceptance import AcceptanceTable, ordered_tree
from .base import DecodeState, StepResult, check_options


class SuffixTrie:
    """Counted suffix trie of bounded depth over token sequences; node 0 is the root.

    Most nodes (deep ones, strings seen once) have a single child: it is stored packed in one int,
    token << 32 | child, instead of a dict, which cuts memory fourfold (to about 60 bytes a node).
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.count: list[int] = [0]
        self.kids: list[dict[int, int] | int | None] = [None]  # None, a packed child or token -> child
        self._free: list[int] = []  # node slots released by remove()
        self.active: list[int] = []  # nodes of the sequence's last 1, 2, ... tokens (depth < max_depth)

    def start(self) -> None:
        """A new sequence: substrings never straddle two sequences."""
        self.active = []

    def append(self, token: int) -> None:
        """The sequence being built grows by one token: every suffix of <= max_depth tokens ends in it."""
        new = [self._step(node, token) for node in [0] + self.active]
        self.active = new[: self.max_depth - 1]

    def children(self, node: int) -> list[tuple[int, int]]:
        """(token, child) pairs of a node."""
        kids = self.kids[node]
        if kids is None:
            return []
        if type(kids) is int:
            return [(kids >> 32, kids & _MASK)]
        return list(kids.items())

    def child(self, node: int, token: int) -> int | None:
        kids = self.kids[node]
        if type(kids) is int:
            return kids & _MASK if kids >> 32 == token else None
        return None if kids is None else kids.get(token)

    def remove(self, seq: list[int]) -> None:
        """Subtract one earlier-added sequence (every substring of it, up to max_depth)."""
        for i in range(len(seq)):
            node, dead = 0, []
            for token in seq[i : i + self.max_depth]:
                parent, node = node, self.child(node, token)
                self.count[node] -= 1
                if self.count[node] == 0:
                    if not dead:  # the shallowest dead node is cut from its live parent
                        kids = self.kids[parent]
                        if type(kids) is int:
                            self.kids[parent] = None
                        else:
                            del kids[token]
                    dead.append(node)
            for node in dead:  # deeper nodes of a dead one are on this path: all others are gone
                self.kids[node] = None
                self._free.append(node)

    def num_nodes(self) -> int:
        return len(self.count) - len(self._free) - 1

    def continuations(self, node: int, k: int) -> list[tuple[int, int, float, int]]:
        """The k most frequent (token, child, probability, support) after `node`'s string."""
        kids = self.children(node)
        if not kids:
            return []
        count = self.count
        total = sum(count[c] for _, c in kids)  # occurrences that were continued
        if len(kids) > k:
            kids = heapq.nlargest(k, kids, key=lambda kv: count[kv[1]])
        return [(token, child, count[child] / total, total) for token, child in kids]

    def _step(self, node: int, token: int) -> int:
        kids = self.kids[node]
        if type(kids) is int and kids >> 32 == token:
            child = kids & _MASK
        elif type(kids) is dict and token in kids:
            child = kids[token]
        else:
            child = self._new_node()
            if kids is None:
                self.kids[node] = token << 32 | child
            elif type(kids) is int:
                self.kids[node] = {kids >> 32: kids & _MASK, token: child}
            else:
                kids[token] = child
        self.count[child] += 1
        return child

    def _new_node(self) -> int:
        if self._free:
            return self._free.pop()
        self.count.append(0)
        self.kids.append(None)
        return len(self.count) - 1


_MASK = (1 << 32) - 1


def _bucket(prob: float, support: int, context: int) -> tuple[int, int, int]:
    """Calibration bucket: probability in fifths (1.0 apart), support 1, 2, 3-4, 5-8, 9+, and the
    length of the context the counts are conditioned on, 1 to 6+ (one shared token is weak evidence)."""
    p = 5 if prob >= 1.0 else int(prob * 5)
    s = 0 if support <= 1 else 1 if support == 2 else 2 if support <= 4 else 3 if support <= 8 else 4
    return p, s, min(context, 6)


def _prior(prob: float, support: int, context: int) -> float:
    """The guess before any statistics: the frequency, shrunk for little support or short context."""
    return prob * support / (support + 1) * min(1.0, 0.4 + 0.15 * context)


class SuffixDecoding:
    name = "suffix"
    summary = "frequency-weighted continuations from a suffix trie over this and earlier requests"
    lossless = True

    def __init__(self, max_depth: int = 24, max_match: int = 8, max_children: int = 4,
                 max_history_tokens: int = 16384, min_score: float = 0.02):
        check_options("suffix", [
            (lambda: is_int(max_depth) and max_depth >= 2, "max_depth must be an integer >= 2"),
            (lambda: is_int(max_match) and 1 <= max_match < max_depth, "max_match must be an integer in [1, max_depth)"),
            (lambda: is_int(max_children) and max_children >= 1, "max_children must be an integer >= 1"),
            (lambda: is_int(max_history_tokens) and max_history_tokens >= 0, "max_history_tokens must be an integer >= 0"),
            (lambda: is_number(min_score) and 0 <= min_score < 1, "min_score must be in [0, 1)"),
        ])
        self.max_depth, self.max_match, self.max_children = max_depth, max_match, max_children
        self.max_history_tokens, self.min_score = max_history_tokens, min_score
        self.trie = SuffixTrie(max_depth)
        self.history: deque[list[int]] = deque()  # finished requests, oldest first
        self.history_tokens = 0
        self.stats = AcceptanceTable()
        self._current: list[int] = []  # the current request's tokens in the trie
        self._live: list[int] | None = None  # the engine's state.tokens, read for the last tokens
        self._keys: list = []

    def begin(self, prompt_ids: list[int]) -> None:
        if self._current or self._live is not None:
            if self._live is not None:
                self._sync(self._live)  # tokens of the last step, decided after the last propose
            self.history.append(self._current)
            self.history_tokens += len(self._current)
            while self.history_tokens > self.max_history_tokens:
                oldest = self.history.popleft()
                self.trie.remove(oldest)
                self.history_tokens -= len(oldest)
        self._current, self._live = [], None
        self._keys = []
        self.trie.start()
        self._sync(prompt_ids)

    def _sync(self, tokens: list[int]) -> None:
        for token in tokens[len(self._current) :]:
            self.trie.append(token)
            self._current.append(token)

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        self._live = state.tokens
        self._sync(state.tokens)
        self._keys = []
        if budget <= 0:
            return DraftTree()
        trie = self.trie
        # The longest suffix of the context (<= max_match tokens) that was continued before.
        depth = min(self.max_match, len(trie.active))  # active[d - 1]: the last d tokens
        while depth and not trie.kids[trie.active[depth - 1]]:
            depth -= 1
        if depth == 0:
            return DraftTree()

        tokens, parents, scores, keys = [], [], [], []
        heap = [(-1.0, 0, trie.active[depth - 1], depth, -1)]  # (-score, tie, trie node, its depth, tree node)
        tie = 1
        while heap and len(tokens) < budget:
            neg_score, _, node, context, tree_node = heapq.heappop(heap)
            for token, child, prob, support in trie.continuations(node, self.max_children):
                key = _bucket(prob, support, context)
                score = -neg_score * self.stats.rate(key, _prior(prob, support, context))
                if score < self.min_score:
                    continue
                # Nodes enter the tree when pushed, children of one parent together, so the
                # (score, depth) ordering below makes the final choice of `budget` nodes.
                tokens.append(token)
                parents.append(tree_node)
                scores.append(score)
                keys.append(key)
                heapq.heappush(heap, (-score, tie, child, context + 1, len(tokens) - 1))
                tie += 1
        tree, order = ordered_tree(tokens, parents, scores, budget)
        self._keys = [keys[i] for i in order]
        return tree

    def observe(self, result: StepResult) -> None:
        if self._keys:
            self.stats.observe(result, self._keys)
