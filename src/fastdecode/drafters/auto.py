"""`auto`, the default method: every cheap drafter proposes, and one merged tree is verified.

Each step the member drafters (n-gram lookup, suffix history, Token Recycling by default) propose
trees whose nodes carry their own, empirically calibrated, acceptance estimates. The trees are
merged into one trie (a token reached by the same path from two drafters is one node, scored by
the higher estimate), cut to the budget by score, and the engine then keeps the part that pays on
this machine's cost curve. So the choice among drafters is made per step and per node by measured
acceptance: the suffix history wins on repeated text, n-gram lookup on text that copies the prompt,
recycling everywhere else, and a drafter that stops paying simply stops getting nodes verified.
Every member sees every verify result, translated into its own node numbers, so all of them keep
learning whichever one won.
"""
from __future__ import annotations

from ..errors import FastDecodeError
from ..runtime.tree import DraftTree
from .base import DecodeState, StepResult

DEFAULT_MEMBERS = ("ngram", "suffix")


class Auto:
    name = "auto"
    summary = "the default: the trees of ngram and suffix (its members) merged into one verified tree"
    lossless = True

    def __init__(self, members: str | list[str] = DEFAULT_MEMBERS):
        from . import METHODS, make_drafter  # the registry imports this module

        names = members.split(",") if isinstance(members, str) else list(members)
        unknown = [m for m in names if m not in METHODS or m in ("auto", "ar")]
        if unknown or not names:
            drafting = [m for m in METHODS if m not in ("auto", "ar")]
            raise FastDecodeError(f"auto: members must be drafting methods among {', '.join(drafting)}, "
                                  f"not {', '.join(unknown) or 'nothing'}")
        self.members = [make_drafter(m) for m in names]
        self._maps: list[tuple[DraftTree, list[int]]] = []

    def begin(self, prompt_ids: list[int]) -> None:
        for member in self.members:
            member.begin(prompt_ids)

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        node_of: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
        self._maps = []  # per member: (its tree, the merged node of each of its nodes)
        for member in self.members:
            tree = member.propose(state, budget)
            if tree.draft_probs is not None:
                raise FastDecodeError(f"auto cannot merge {member.name}'s sampled drafts")
            mapped: list[int] = []
            for token, parent, score in zip(tree.tokens, tree.parents, tree.scores or [0.0] * len(tree)):
                key = (mapped[parent] if parent >= 0 else -1, token)
                if key not in node_of:
                    node_of[key] = len(tokens)
                    tokens.append(token)
                    parents.append(key[0])
                    scores.append(score)
                else:
                    scores[node_of[key]] = max(scores[node_of[key]], score)
                mapped.append(node_of[key])
            self._maps.append((tree, mapped))
        merged = DraftTree(tokens, parents, scores=scores)
        if len(merged) <= budget:
            return merged
        best = sorted(sorted(range(len(merged)), key=lambda i: (-scores[i], i))[:budget])
        renumber = {old: new for new, old in enumerate(best)}
        self._maps = [(tree, [renumber.get(m, -1) for m in mapped]) for tree, mapped in self._maps]
        return merged.subtree(best)

    def observe(self, result: StepResult) -> None:
        for member, (tree, mapped) in zip(self.members, self._maps):
            member.observe(member_result(result, tree, mapped))


def member_result(result: StepResult, tree: DraftTree, mapped: list[int]) -> StepResult:
    """The merged tree's result in one member's node numbers (mapped[i]: the merged node of its
    node i, -1 if the budget cut dropped it). A member's nodes form a sub-trie of the merged tree,
    so the accepted merged path restricted to them is a path from the root of the member's tree."""
    own = {m: i for i, m in enumerate(mapped) if m >= 0}
    rows = [result.rows[m] if m >= 0 else -1 for m in mapped]
    accepted = []
    for m in result.accepted:
        if m not in own:
            break
        accepted.append(own[m])
    return StepResult(tree, rows, accepted, result.new_tokens, result.logits, result.hidden)
