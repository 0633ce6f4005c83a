"""What the trained drafters (eagle, medusa, hydra) share: their head, and the tree they grow.

The tree is EAGLE-2's dynamic tree (Li et al. 2024, "EAGLE-2: Faster Inference of Language Models
with Dynamic Draft Trees"): the head's distribution at the root gives the first candidates; at
each depth the `beam` best candidates so far (by score) are expanded, each into its `top_k` most
likely children, for `depth` levels; the engine then keeps the part that pays on this machine's
cost curve. A node's score estimates the probability that it is accepted: the product, along its
path, of the head's probability of each token corrected by how often the target has accepted
tokens of that probability at that depth (acceptance.Calibration, learned as it runs). Scores fall
along every path, so any best-scored set of nodes holds its ancestors. How far the tree grows and
whether a step is drafted at all both follow this machine's costs (_paying, resting): on a CPU
where drafting a step costs more than its accepted tokens save, the head rests.

Exactness. Greedy: any tree is verified against the target's argmax. Sampling: the head's logits
over its vocabulary go through the request's temperature / top-k / top-p / min-p, giving q; a
node's children are drawn from q without replacement, each child with its own conditional
distribution (q with the earlier siblings removed) as its draft probabilities. Recursive
rejection sampling is exact when each child's token was drawn from the distribution handed over
with it, given everything the drafter knew, which holds here (runtime/verify.py).
"""
from __future__ import annotations

import time

import torch

from ..errors import FastDecodeError
from ..heads import load_head, shipped_head
from ..heads.blocks import pack_for_drafting
from ..models.loader import model_source
from ..runtime.sampling import is_int, is_number, target_probabilities
from ..runtime.tree import DraftTree
from .acceptance import Calibration
from .base import DecodeState, StepResult, Target, check_options

DEPTH_KEYS = 4  # depths beyond this share the calibration of depth 4
EXPLORE_EVERY = 16  # one proposal in this many grows regardless of cost, so the child rates stay measured
WARMUP = 16  # proposals before a drafter may rest (TrainedDrafter.resting)
PROBE_EVERY = 8  # a resting drafter still drafts on one step in this many, to keep its value measured
# The head's matrices in bfloat16 for drafting (trained in float32): half the bytes to stream per
# draft step, and a draft's precision changes only what is proposed, never what is accepted.
DRAFT_DTYPE = torch.bfloat16


def _weights_file(model_name: str):
    """The file (or folder) the target was loaded from, whose hash a head's card names; None for a
    model built in memory (tests), which is then checked by its shape only."""
    try:
        return model_source(model_name)
    except FastDecodeError:
        return None


def load_trained(kind: str, target: Target, head: str | None, noun: str = "head", method: str | None = None):
    """(the trained module, its card, its path) of this kind for the target: the file `head`, else
    the one shipped for the target. One clear error where none ships, or the file holds another kind;
    load_head checks that it was trained for this target. `method` names the option in the error."""
    path = head or shipped_head(kind, target.name)
    if path is None:
        raise FastDecodeError(
            f"no {kind} {noun} ships for model {target.name!r}; train one with "
            f"`fastdecode train --model {target.name} --heads {kind}` and pass it with "
            f"--option {method or kind}.head=PATH")
    loaded, card = load_head(path, target.model, _weights_file(target.name))
    if loaded.kind != kind:
        raise FastDecodeError(f"{path} holds a {loaded.kind} head, not a {kind} {noun}")
    return loaded, card, path


# A node is expanded only while its estimated acceptance is at least this, and only where its
# children can pay on this machine's costs (TrainedDrafter._paying). The floor was measured before
# that rule, with the first shipped eagle head on 6 Spec-Bench questions (2-core Zen 4): 0.01 gave
# 0.75x of ar's speed, 0.1 0.91x, 0.25 0.94x, at the same acceptance length.
MIN_SCORE = 0.25


class TrainedDrafter:
    """A drafter reading a trained head; subclasses say how the head drafts a tree (_draft) and what
    it reads (_ready, _catch_up)."""

    kind = ""
    lossless = True
    needs_target = True

    def __init__(self, target: Target, head: str | None = None, depth: int = 5, beam: int = 4,
                 top_k: int = 4, min_score: float = MIN_SCORE, rest: bool = True):
        check_options(self.kind, [
            (lambda: is_int(depth) and 1 <= depth <= 16, "depth must be an integer in [1, 16]"),
            (lambda: is_int(beam) and 1 <= beam <= 32, "beam must be an integer in [1, 32]"),
            (lambda: is_int(top_k) and 1 <= top_k <= 32, "top_k must be an integer in [1, 32]"),
            (lambda: is_number(min_score) and 0 <= min_score < 1, "min_score must be in [0, 1)"),
            (lambda: isinstance(rest, bool), "rest must be true or false"),
        ])
        self.head, self.card, _ = load_trained(self.kind, target, head)
        pack_for_drafting(self.head, DRAFT_DTYPE)
        self.model = target.model
        self.vocab_size = target.model.config.vocab_size
        self.eos_ids = target.tokenizer.eos_ids
        self.depth, self.beam, self.top_k, self.min_score = depth, beam, top_k, min_score
        self.hidden_layers = tuple(self.head.layers)
        self.draft_ids = self.head.draft_ids.tolist()
        self.calibration = Calibration()  # kept across requests
        self._contexts: list[tuple] = []  # calibration key of each proposed node
        self._q: list[float] = []  # the head's probability of each proposed node's token
        self.target = target
        self._expand_seconds: float | None = None  # what expanding a frontier takes, on average
        self._child_rate: dict[int, float] = {}  # depth -> mean calibrated rate of an expanded node's best child
        self._proposals = 0
        self.rest = rest
        self._value: float | None = None  # seconds a drafted step saves, on average (resting)
        self._steps = 0  # steps asked to draft, resting or not
        self._drafted: float | None = None  # the last proposal's drafting time, until its result is seen

    # ---- whether to draft at all ---------------------------------------------------------------

    def resting(self) -> bool:
        """Whether to skip drafting this step, because drafting has not paid for itself lately. A
        drafted step saves a plain step per accepted node, pays for its extra verify rows (on the
        cost curve) and for its drafting time (measured); `_value` is the mean of that over recent
        drafted steps. While it is negative the drafter proposes nothing, except on one step in
        PROBE_EVERY, which keeps it measured. The tree's cost-aware growth (_paying) decides how much
        to draft; this decides whether to draft at all. On a 2-core Zen 3 the shipped heads lose
        time on most steps (`eagle` accepted 0.17 tokens a step for about 2.5 ms of drafting and
        1 ms of verify rows, against a 9 ms step), so they rest there; on a GPU they never do.
        `rest=False` drafts on every step (to measure a head as it is)."""
        self._steps += 1
        if not self.rest or self._value is None or self._proposals < WARMUP:
            return False
        return self._value <= 0 and self._steps % PROBE_EVERY != 0

    @torch.no_grad()
    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        """Nothing without a budget, before the head has a state to read, or while resting (what a
        step owes the head waits for the next drafted step); else the subclass's tree (_draft), its
        time measured for the resting rule."""
        if budget <= 0 or not self._ready() or self.resting():
            return DraftTree()
        if not state.params.greedy and self.generator is None:
            self.begin_sampling(state.params)
        self._catch_up(state.tokens)
        started = time.perf_counter()
        tree = self._draft(state, budget)
        self._drafted = time.perf_counter() - started
        return tree

    def _ready(self) -> bool:
        """Whether the head has what it reads (medusa: the state of the row before the root)."""
        return True

    def _catch_up(self, tokens: list[int]) -> None:
        """Work the text so far owes the head whether it drafts now or later (eagle feeds its pairs)."""

    def _draft(self, state: DecodeState, budget: int) -> DraftTree:
        raise NotImplementedError

    def _learn_value(self, result: StepResult, drafting: float) -> None:
        curve = self.target.cost_curve
        rows = sum(row >= 0 for row in result.rows)
        saved = len(result.accepted) * curve.cost(1) - (curve.cost(1 + rows) - curve.cost(1)) - drafting
        self._value = saved if self._value is None else 0.8 * self._value + 0.2 * saved

    # ---- growing the tree ----------------------------------------------------------------------

    def grow(self, root_logits: torch.Tensor, expand, params, budget: int) -> DraftTree:
        """The dynamic tree: root_logits [draft_vocab] are the head's logits for the root's children;
        expand(nodes, depth, tokens, parents) returns the logits [len(nodes), draft_vocab] for the
        children of those nodes, all at `depth` (tokens: draft-vocabulary indices of every node so far)."""
        greedy = params.greedy
        self._proposals += 1
        tokens: list[int] = []  # draft-vocabulary indices until the end
        parents: list[int] = []
        scores: list[float] = []
        q_token: list[float] = []
        q_rows: list[torch.Tensor] = []  # sampling: each node's conditional draft distribution
        contexts: list[tuple] = []
        frontier, frontier_logits = [-1], root_logits[None]
        for depth in range(1, self.depth + 1):
            level = []
            best_rate: dict[int, float] = {}  # parent -> the calibrated rate of its best child
            context = (greedy, min(depth, DEPTH_KEYS))
            for parent, children in zip(frontier, self._children(frontier_logits, params)):
                for token, q, row in children:
                    rate = self.calibration.rate(context, q)
                    best_rate[parent] = max(best_rate.get(parent, 0.0), rate)
                    score = (1.0 if parent < 0 else scores[parent]) * rate
                    level.append(len(tokens))
                    tokens.append(token)
                    parents.append(parent)
                    scores.append(score)
                    q_token.append(q)
                    contexts.append(context)
                    if row is not None:
                        q_rows.append(row)
            if depth == self.depth:
                break
            if depth > 1:
                self._learn_child_rate(depth, best_rate.values())
            frontier = [n for n in sorted(level, key=lambda n: -scores[n])
                        if scores[n] >= self.min_score and self.draft_ids[tokens[n]] not in self.eos_ids][: self.beam]
            if self._proposals % EXPLORE_EVERY:  # else grow as the head allows, to keep measuring the rates
                frontier = self._paying(frontier, scores, depth + 1)
            if not frontier:
                break
            started = time.perf_counter()
            frontier_logits = expand(frontier, depth, tokens, parents)
            spent = time.perf_counter() - started
            self._expand_seconds = spent if self._expand_seconds is None else 0.8 * self._expand_seconds + 0.2 * spent
        order = sorted(range(len(tokens)), key=lambda n: (-scores[n], n))[:budget]
        order.sort()  # parents come before children, and a parent scores at least its child
        keep = {old: new for new, old in enumerate(order)}
        self._contexts = [contexts[n] for n in order]
        self._q = [q_token[n] for n in order]
        tree = DraftTree([self.draft_ids[tokens[n]] for n in order],
                         [keep[parents[n]] if parents[n] >= 0 else -1 for n in order],
                         scores=[scores[n] for n in order])
        if q_rows:
            probs = torch.zeros(len(order), self.vocab_size)
            probs[:, self.draft_ids] = torch.stack([q_rows[n] for n in order])
            tree.draft_probs = probs
        return tree

    def _paying(self, frontier: list[int], scores: list[float], depth: int) -> list[int]:
        """The frontier nodes worth expanding into children at `depth`, on this machine's costs. A
        child is verified only if its score beats the cost of one more verify row (the cost curve's
        second row, in plain steps: each accepted token saves one), and its score is its parent's
        times the rate the head's best child has been accepted at, at that depth (learned; 1 until
        measured). The expansion as a whole must also earn its own time, measured as it runs. On a
        GPU both costs are near zero and the tree grows as EAGLE-2's; on a 2-core CPU a row costs a
        third of a step and an expansion a tenth, so only confident chains grow."""
        curve = self.target.cost_curve
        step = curve.cost(1)
        row = curve.cost(2) / step - 1
        rate = self._child_rate.get(min(depth, DEPTH_KEYS), 1.0)
        gains = {n: scores[n] * rate - row for n in frontier}
        paying = [n for n in frontier if gains[n] > 0]
        return paying if sum(gains[n] for n in paying) * step > (self._expand_seconds or 0.0) else []

    def _learn_child_rate(self, depth: int, best_rates) -> None:
        """Keep the mean rate at which the best child of an expanded node is expected to be accepted."""
        key = min(depth, DEPTH_KEYS)
        for rate in best_rates:
            old = self._child_rate.get(key)
            self._child_rate[key] = rate if old is None else 0.95 * old + 0.05 * rate

    def _children(self, logits: torch.Tensor, params) -> list[list[tuple[int, float, torch.Tensor | None]]]:
        """For each row of logits [n, draft_vocab] (one node each), its children as (draft index, its
        probability, its conditional distribution or None): the top_k under greedy; top_k draws
        without replacement under sampling."""
        k = min(self.top_k, logits.shape[-1])
        if params.greedy:
            top = torch.softmax(logits.float(), -1).topk(k)
            return [[(i, p, None) for p, i in zip(ps, ids)] for ps, ids in zip(top.values.tolist(), top.indices.tolist())]
        out = []
        for q in target_probabilities(logits.float(), params):
            children = []
            for _ in range(k):
                total = q.sum()
                if total <= 0:
                    break
                q = q / total
                token = int(torch.multinomial(q, 1, generator=self.generator))
                children.append((token, float(q[token]), q.clone()))
                q[token] = 0.0
            out.append(children)
        return out

    def begin_sampling(self, params) -> None:
        """The drafter's own random stream, derived from the request's seed (independent of the
        verifier's stream, reproducible for a seeded request)."""
        self.generator = torch.Generator().manual_seed(((params.seed or 0) * 7919 + 17) % 2**63)

    # ---- learning from the verifier ------------------------------------------------------------

    def observe_scores(self, result: StepResult) -> None:
        drafted, self._drafted = self._drafted, None
        if len(result.tree) != len(self._q):
            return  # not this drafter's last proposal (nothing was proposed)
        if drafted is not None:
            self._learn_value(result, drafted)
        taken = set(result.accepted)
        for node in result.tried():
            self.calibration.record(self._contexts[node], self._q[node], node in taken)
