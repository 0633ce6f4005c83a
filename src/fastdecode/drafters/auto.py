"""`auto`, the default method: several drafters propose, and one merged tree is verified.

Each step the member drafters propose trees whose nodes carry their own, empirically calibrated,
acceptance estimates. The members are `ngram` and `suffix` by default; `members=eagle,ngram,suffix`
(or passing `head`) adds a trained head, SAMD's idea: the suffix history and prompt lookup take
over on repeated text, the head everywhere else. The head is not a default member on this CPU:
on 60 Spec-Bench questions (2-core Zen 4), `auto` with the shipped eagle head ran at 1.13x of
`ar` (3.07 tokens per forward) and without it at 1.30x (3.33), each against `ar` in its own run;
the head's own draft steps cost more than its extra accepted tokens return. The trees are
merged into one trie (a token reached by the same path from two drafters is one node), cut to the
budget by score, and the engine then keeps the part that pays on this machine's cost curve.

Scores. Each member's estimate is calibrated on its own proposals overall, but what decides the
merge is how a member fares where the members disagree: measured on Spec-Bench prompts, `ngram`
alone accepted fewer tokens than `suffix`, yet its nodes outscored suffix's in the merged tree, and
the merge accepted less than suffix alone. So `auto` keeps its own acceptance table over the merged
nodes, keyed by who proposed the node (one member, or several agreeing), its depth and the best
member's estimate of P(accepted | parent accepted); that estimate is also the prior. A node's score
is the product of these rates along its path, so the merge learns, per kind of node, whom to trust.
Every member also sees every verify result, translated into its own node numbers, so all of them
keep learning whichever one won.

Cost. Every member proposes every step, so what they propose must stay cheap: `auto` asks each for
at most twice the most nodes the size rule has kept in its last 64 steps (at least 8). On a 2-core
Zen 3, where a draft row costs a third of a forward and the rule keeps a few nodes, that (with
`ngram` following matches only as deep as its budget) cut proposing from 0.37 to 0.23 ms a step on
12 Spec-Bench questions, against `suffix`'s 0.12 alone; where longer drafts start to pay, the
request doubles step by step. And a member proposes only while what it adds pays for its time
(`_members_to_ask`): the others proposing what it would, it rests, and every member proposes on
one step in eight, so that what each adds stays measured. A resting member is still told every
result (it follows the text, and a head keeps the target's states). When one member alone
proposes, its tree is verified as it proposed it, scored by its own calibration.

Sampling: a node keeps its draft probabilities q only when exactly one member proposed it and drew
it from q; a node proposed by several members, or by a rule, is verified as a point mass. Both
are exact (runtime/verify.py): what matters is that each q is what its token was drawn from.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter, deque

import torch

from ..errors import FastDecodeError
from ..runtime.tree import DraftTree
from .acceptance import AcceptanceTable
from .base import DecodeState, StepResult, Target

DEFAULT_MEMBERS = ("ngram", "suffix")
RATE_BINS = 10  # buckets of the best member estimate in auto's own table
MAX_DEPTH_KEY = 6
MIN_ASK = 8  # nodes asked of each member, at least
RECENT_STEPS = 64  # steps whose kept sizes set the request (and steps of every member that rank them)
FULL_EVERY = 8  # every member proposes on one step in this many


class Auto:
    name = "auto"
    summary = "the default: the trees of ngram and suffix (and eagle, when asked) merged into one verified tree"
    lossless = True
    needs_target = True

    def __init__(self, target: Target | None = None, members: str | list[str] | None = None, head: str | None = None,
                 lud_head: str | None = None):
        """members: comma list of drafting methods (default: ngram, suffix; with `head`, eagle too);
        head: the eagle member's head file, when not the shipped one; lud_head: the lud member's file."""
        from . import METHODS, make_drafter  # the registry imports this module

        if members is None:
            members = ("eagle",) * (head is not None) + DEFAULT_MEMBERS
        names = members.split(",") if isinstance(members, str) else list(members)
        unknown = [m for m in names if m not in METHODS or m in ("auto", "ar")]
        if unknown or not names:
            drafting = [m for m in METHODS if m not in ("auto", "ar")]
            raise FastDecodeError(f"auto: members must be drafting methods among {', '.join(drafting)}, "
                                  f"not {', '.join(unknown) or 'nothing'}")
        lossy = [m for m in names if not METHODS[m].lossless]
        if lossy:
            raise FastDecodeError(f"auto: members must be lossless, and {', '.join(lossy)} is not")
        files = {"eagle": head, "lud": lud_head}
        self.members = [make_drafter(m, target, **({"head": files[m]} if files.get(m) else {})) for m in names]
        # A member's placeholder rows (lud) ride in every verify forward; their logits go back to it.
        self.placeholders = next((m.placeholders for m in self.members if getattr(m, "placeholders", None) is not None), None)
        # The union of the members' layers is captured; each member reads its own columns.
        self.hidden_layers = tuple(sorted({i for m in self.members for i in getattr(m, "hidden_layers", ())}))
        self._columns = [[self.hidden_layers.index(i) for i in getattr(m, "hidden_layers", ())] for m in self.members]
        self._maps: list[tuple[DraftTree, list[int]]] = []
        self.stats = AcceptanceTable()  # kept across requests
        self._keys: list[tuple] = []
        self._sources = {}  # proposers bit mask -> "ngram+suffix"
        self._kept = deque([MIN_ASK], maxlen=RECENT_STEPS)  # nodes verified per recent step
        self.target = target
        self._everyone = (1 << len(self.members)) - 1
        self._asked = self._everyone  # bit m: member m proposed this step
        self._steps = 0
        self._full = deque(maxlen=RECENT_STEPS)  # steps every member proposed: proposer masks of the accepted nodes
        self._accepted = Counter()  # proposer mask -> accepted nodes with it, over the steps in _full
        self._seconds: list[float | None] = [None] * len(self.members)  # each member's proposing time, on average

    def begin(self, prompt_ids: list[int]) -> None:
        for member in self.members:
            member.begin(prompt_ids)

    def prefilled(self, start: int, hidden: torch.Tensor) -> None:
        for member, columns in zip(self.members, self._columns):
            if columns:
                member.prefilled(start, hidden[:, columns])

    def guessed(self, placeholder_logits: torch.Tensor) -> None:
        for member in self.members:
            if getattr(member, "placeholders", None) is not None:
                member.guessed(placeholder_logits)

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []
        proposers: list[int] = []  # bit m: member m proposed the node
        estimate: list[float] = []  # the best member estimate of P(accepted | parent accepted)
        q_rows: list[torch.Tensor | None] = []  # a node's q, None for a point mass
        node_of: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
        self._maps = []  # per member: (its tree, the merged node of each of its nodes)
        ask = min(budget, max(MIN_ASK, 2 * max(self._kept)))
        self._asked = self._members_to_ask()
        trees = []
        for m, member in enumerate(self.members):
            started = time.perf_counter()
            trees.append(member.propose(state, ask if self._asked >> m & 1 else 0))  # 0: it only follows the text
            if self._asked >> m & 1:
                spent, seconds = time.perf_counter() - started, self._seconds[m]
                self._seconds[m] = spent if seconds is None else 0.9 * seconds + 0.1 * spent
        if self._asked & (self._asked - 1) == 0:  # one member proposed: its tree as it is
            return self._alone(trees, self._asked.bit_length() - 1)
        for m, tree in enumerate(trees):
            mapped: list[int] = []
            for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
                score = tree.scores[i] if tree.scores else 0.0
                above = (tree.scores[parent] if parent >= 0 else 1.0) if tree.scores else 1.0
                conditional = min(1.0, score / above) if above > 0 else 0.0
                key = (mapped[parent] if parent >= 0 else -1, token)
                if key not in node_of:
                    node_of[key] = len(tokens)
                    tokens.append(token)
                    parents.append(key[0])
                    proposers.append(0)
                    estimate.append(0.0)
                    q_rows.append(None if tree.draft_probs is None else tree.draft_probs[i])
                else:
                    q_rows[node_of[key]] = None  # two proposers: no single q drew it
                node = node_of[key]
                proposers[node] |= 1 << m
                estimate[node] = max(estimate[node], conditional)
                mapped.append(node)
            self._maps.append((tree, mapped))
        scores, depths, keys = [], [], []
        for node, parent in enumerate(parents):  # parents come first
            depths.append(1 if parent < 0 else depths[parent] + 1)
            key = (proposers[node], self._asked, min(depths[node], MAX_DEPTH_KEY),
                   min(int(estimate[node] * RATE_BINS), RATE_BINS - 1))
            keys.append(key)
            scores.append((1.0 if parent < 0 else scores[parent]) * self.stats.rate(key, estimate[node]))
        merged = DraftTree(tokens, parents, scores=scores, sources=[self._source(bits) for bits in proposers])
        if any(q is not None for q in q_rows):
            vocab = next(q for q in q_rows if q is not None).shape[-1]
            merged.draft_probs = torch.stack([torch.zeros(vocab) if q is None else q for q in q_rows])
        self._keys = keys
        if len(merged) <= budget:
            return merged
        best = sorted(sorted(range(len(merged)), key=lambda i: (-scores[i], i))[:budget])
        renumber = {old: new for new, old in enumerate(best)}
        self._maps = [(tree, [renumber.get(m, -1) for m in mapped]) for tree, mapped in self._maps]
        self._keys = [keys[i] for i in best]
        return merged.subtree(best)

    def _alone(self, trees: list[DraftTree], m: int) -> DraftTree:
        """Member m's tree, its own scores and all, when it alone proposed: nothing to merge, and
        auto's table (which weighs members against each other) would only redo the member's own
        calibration, coarser. On Spec-Bench's RAG questions (2-core Zen 3), rescored `suffix` trees
        accepted 4.3 tokens a drafted step against `suffix`'s own 5.4 (0.04x behind it); passed
        through, 4.9 (0.02x behind)."""
        self._maps = [(tree, list(range(len(tree))) if k == m else []) for k, tree in enumerate(trees)]
        self._keys = []  # no node of auto's table: it learns on the steps where members meet
        alone = trees[m]
        return dataclasses.replace(alone, sources=alone.sources or [self.members[m].name] * len(alone))

    def _members_to_ask(self) -> int:
        """Which members propose this step (bit m: member m). The one whose nodes were accepted most
        always does; each other member only while what it adds pays for its proposing time: the
        accepted nodes that it proposed and no member asked before it did, per step, times the
        time a token takes (a step) must beat its own time. Every member proposes on the first
        steps and on one step in FULL_EVERY, which is where what each adds is measured. Measured on
        24 Spec-Bench questions (2-core Zen 3): of the tokens `auto` accepted, 756 came from
        nodes both `ngram` and `suffix` proposed, 30 from `suffix` alone and 1 from `ngram` alone,
        so `ngram` mostly rests and `auto` costs little more than `suffix`."""
        self._steps += 1
        if self.target is None or len(self._full) < RECENT_STEPS // 4 or self._steps % FULL_EVERY == 0:
            return self._everyone
        counts = self._accepted.items()
        ranked = sorted(range(len(self.members)), key=lambda m: -sum(n for mask, n in counts if mask >> m & 1))
        step = self.target.cost_curve.cost(1)
        asked = 1 << ranked[0]
        for m in ranked[1:]:
            adds = sum(n for mask, n in counts if mask >> m & 1 and not mask & asked) / len(self._full)
            if adds * step > (self._seconds[m] or 0.0):
                asked |= 1 << m
        return asked

    def _remember_full_step(self, masks: list[int]) -> None:
        """Keep the accepted nodes' proposer masks of a step every member proposed, counted per
        mask over the last RECENT_STEPS such steps (so asking costs no pass over the window)."""
        if len(self._full) == self._full.maxlen:
            self._accepted.subtract(self._full[0])
        self._full.append(masks)
        self._accepted.update(masks)

    def _source(self, bits: int) -> str:
        if bits not in self._sources:
            self._sources[bits] = "+".join(m.name for k, m in enumerate(self.members) if bits >> k & 1)
        return self._sources[bits]

    def observe(self, result: StepResult) -> None:
        self._kept.append(sum(row >= 0 for row in result.rows))
        if not len(result.tree):  # nothing was proposed (no room left): members saw no proposal either
            self._maps = [(DraftTree(), []) for _ in self.members]
        elif self._keys and len(self._keys) == len(result.tree):
            self.stats.observe(result, self._keys)
            if self._asked == self._everyone:
                self._remember_full_step([self._keys[n][0] for n in result.accepted])  # key[0]: the proposers
        for member, columns, (tree, mapped) in zip(self.members, self._columns, self._maps):
            member.observe(member_result(result, tree, mapped, columns))


def member_result(result: StepResult, tree: DraftTree, mapped: list[int], columns: list[int]) -> StepResult:
    """The merged tree's result in one member's node numbers (mapped[i]: the merged node of its
    node i, -1 if the budget cut dropped it). A member's nodes form a sub-trie of the merged tree,
    so the accepted merged path restricted to them is a path from the root of the member's tree.
    The committed rows' states and tokens are the whole step's, whoever proposed them."""
    own = {m: i for i, m in enumerate(mapped) if m >= 0}
    rows = [result.rows[m] if m >= 0 else -1 for m in mapped]
    accepted = []
    for m in result.accepted:
        if m not in own:
            break
        accepted.append(own[m])
    hidden = result.hidden[:, columns] if columns and result.hidden is not None else None
    chains = result.placeholder_logits
    if chains is not None:
        chains = {-1 if m < 0 else own[m]: chain for m, chain in chains.items() if m < 0 or m in own}
    return StepResult(tree, rows, accepted, result.new_tokens, result.logits, hidden, chains)
