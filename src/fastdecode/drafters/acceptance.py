"""Running acceptance statistics: how often the target accepts what a drafter proposes.

AcceptanceTable serves drafters that choose tokens by rule (ngram, suffix, recycling, lookahead);
Calibration serves drafters with a draft distribution (draft model, trained heads).


AcceptanceTable: a drafter labels each proposed node with a feature key (say, match length and depth). The table
estimates P(node accepted | its parent accepted) per key, a Beta-Bernoulli mean pulled towards a
prior guess; the score of a node is the product of these rates along its path, so scores never
increase from parent to child. Results come in the proposal's own node numbers (StepResult), so
keys are simply indexed by proposed node.
"""
from __future__ import annotations

from ..runtime.tree import DraftTree
from .base import StepResult


class AcceptanceTable:
    def __init__(self, prior_weight: float = 2.0, max_trials: float = 2000.0):
        self.prior_weight = prior_weight
        self.max_trials = max_trials  # beyond this a key's counts are halved, so the rate can drift
        self._table: dict[object, list[float]] = {}  # key -> [accepted, trials]

    def rate(self, key: object, prior: float) -> float:
        hits, trials = self._table.get(key, (0.0, 0.0))
        return (hits + self.prior_weight * prior) / (trials + self.prior_weight)

    def record(self, key: object, accepted: bool) -> None:
        entry = self._table.setdefault(key, [0.0, 0.0])
        entry[0] += accepted
        entry[1] += 1
        if entry[1] > self.max_trials:
            entry[0] /= 2
            entry[1] /= 2

    def trials(self, key: object) -> float:
        return self._table.get(key, (0.0, 0.0))[1]

    def observe(self, result: StepResult, keys: list) -> None:
        """Record every node the target judged; keys[i] is the feature key of proposed node i."""
        taken = set(result.accepted)
        for node in result.tried():
            self.record(keys[node], node in taken)


def ordered_tree(tokens: list[int], parents: list[int], scores: list[float], budget: int) -> tuple[DraftTree, list[int]]:
    """The `budget` best nodes by score as a DraftTree (parents first on ties, so the kept set is
    closed under parents), and the old index of each of its nodes."""
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    order = sorted(range(len(tokens)), key=lambda i: (-scores[i], depth[i], i))[:budget]
    new_index = {old: new for new, old in enumerate(order)}
    new_parents = [new_index[parents[i]] if parents[i] >= 0 else -1 for i in order]
    return DraftTree([tokens[i] for i in order], new_parents, scores=[scores[i] for i in order]), order


BINS = 10  # draft probability bins of the calibration table
PRIOR_WEIGHT = 2.0  # pseudo-counts that keep a young bin's correction near 1
MAX_TRIALS = 2000.0  # beyond this a bin's counts are halved, so its correction can drift


class Calibration:
    """P(draft token accepted | parent accepted) from the draft's probability q of that token.

    Per bin of q (and a context key, such as greedy vs sampling or the depth) it keeps the accepted
    count and the sum of q over the same trials; their ratio scales q. A draft that is under- or
    over-confident gets corrected.
    """

    def __init__(self):
        self._table: dict[tuple, list[float]] = {}  # key -> [accepted, sum of q, trials]

    @staticmethod
    def key(context, q: float) -> tuple:
        return context, min(int(q * BINS), BINS - 1)

    def rate(self, context, q: float) -> float:
        accepted, predicted, _ = self._table.get(self.key(context, q), (0.0, 0.0, 0.0))
        return min(1.0, q * (accepted + PRIOR_WEIGHT) / (predicted + PRIOR_WEIGHT))

    def record(self, context, q: float, accepted: bool) -> None:
        entry = self._table.setdefault(self.key(context, q), [0.0, 0.0, 0.0])
        entry[0] += accepted
        entry[1] += q
        entry[2] += 1
        if entry[2] > MAX_TRIALS:
            entry[:] = [x / 2 for x in entry]
