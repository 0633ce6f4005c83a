"""Verification as pure functions: greedy acceptance, and sampling that keeps the target's
distribution exactly (checked with chi-square tests over many trials on toy distributions)."""
from __future__ import annotations

import pytest
import torch

from fastdecode.runtime.cost_curve import CostCurve
from fastdecode.runtime.draft_size import best_nodes
from fastdecode.runtime.sampling import SamplingParams, target_probabilities
from fastdecode.runtime.tree import DraftTree
from fastdecode.runtime.verify import verify_greedy, verify_sampling

from stats import chi_square_p_value

VOCAB = 6
# Target logits of the verify rows of TREE: root, node 0 (token 1), node 1 (token 2), node 2 (token 3).
LOGITS = torch.tensor([
    [2.0, 1.5, 1.0, 0.5, 0.0, -1.0],
    [0.0, 0.3, 2.0, 1.0, -0.5, 0.2],
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    [0.5, 2.5, 0.0, 0.0, 1.0, 0.0],
])
TREE = DraftTree([1, 2, 3], [-1, -1, 0])  # root -> {1 -> 3, 2}
TRIALS = 12000


def _first_two_tokens(tree, logits, params, trials, seed=0, q_sampler=None):
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(VOCAB)
    second_after_1 = torch.zeros(VOCAB)
    for _ in range(trials):
        t = tree if q_sampler is None else q_sampler(g)
        path, bonus = verify_sampling(t, logits, params, g)
        emitted = [t.tokens[i] for i in path] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 1 and len(emitted) > 1:
            second_after_1[emitted[1]] += 1
    return first, second_after_1


def test_greedy_takes_the_longest_matching_path_and_the_bonus():
    logits = torch.full((4, VOCAB), -5.0)
    logits[0, 1] = logits[1, 3] = logits[3, 4] = 5.0  # argmax: root -> 1 -> 3 -> 4
    logits[2, 0] = 5.0
    assert verify_greedy(TREE, logits) == ([0, 2], 4)
    assert verify_greedy(TREE, logits, eos_ids=frozenset({1})) == ([0], 3)  # nothing after EOS
    logits[0, 1], logits[0, 5] = 0.0, 5.0
    assert verify_greedy(TREE, logits) == ([], 5)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
])
def test_point_mass_tree_keeps_the_target_distribution(params):
    """Drafters without probabilities (n-gram, suffix, ...) propose point masses; siblings are
    tried in turn against the residual."""
    first, second = _first_two_tokens(TREE, LOGITS, params, TRIALS)
    probs = target_probabilities(LOGITS, params)
    assert chi_square_p_value(first, probs[0]) > 1e-3
    # After accepting node 0 (token 1) the next token follows the target at node 0's row.
    assert second.sum() > 500
    assert chi_square_p_value(second, probs[1]) > 1e-3


def test_draft_probabilities_keep_the_target_distribution():
    """A chain drawn from a draft distribution q: accept with min(1, p/q), else sample the residual."""
    params = SamplingParams(temperature=1.0)
    q_root = torch.softmax(torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0, 0.5]), -1)  # favours token 1 too much
    q_next = torch.softmax(torch.tensor([0.0, 0.0, 0.0, 2.0, 0.0, 0.0]), -1)

    def sampler(g):
        a = int(torch.multinomial(q_root, 1, generator=g))
        b = int(torch.multinomial(q_next, 1, generator=g))
        return DraftTree([a, b], [-1, 0], draft_probs=torch.stack([q_root, q_next]))

    # The verify rows are root, then node 0 whatever its token; the test only conditions on token 1.
    logits = LOGITS[[0, 1, 2]]
    first, second = _first_two_tokens(None, logits, params, TRIALS, q_sampler=sampler)
    probs = target_probabilities(logits, params)
    assert chi_square_p_value(first, probs[0]) > 1e-3
    assert chi_square_p_value(second, probs[1]) > 1e-3


def test_iid_siblings_from_q_keep_the_target_distribution():
    params = SamplingParams(temperature=1.0)
    q = torch.softmax(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0]), -1)

    def sampler(g):
        a, b = torch.multinomial(q, 2, replacement=True, generator=g).tolist()
        return DraftTree([a, b], [-1, -1], draft_probs=torch.stack([q, q]))

    first, _ = _first_two_tokens(None, LOGITS[:3], params, TRIALS, q_sampler=sampler)
    assert chi_square_p_value(first, target_probabilities(LOGITS[:1], params)[0]) > 1e-3


def test_the_test_can_fail():
    """A biased verifier (always accepting the first child) is caught by the same check."""
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(VOCAB)
    for _ in range(2000):
        counts[1 if torch.rand((), generator=g) < 0.6 else int(torch.multinomial(target_probabilities(LOGITS[:1], params)[0], 1, generator=g))] += 1
    assert chi_square_p_value(counts, target_probabilities(LOGITS[:1], params)[0]) < 1e-6


def test_nothing_after_eos_is_accepted_when_sampling():
    logits = torch.full((4, VOCAB), -20.0)
    logits[:, 1] = logits[:, 3] = 20.0  # token 1 then token 3 are near certain
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        path, _ = verify_sampling(TREE, logits, SamplingParams(temperature=1.0), g, eos_ids=frozenset({1}))
        assert path in ([0], [])


CURVE = CostCurve([1, 8, 16, 32, 64], [0.010, 0.011, 0.014, 0.020, 0.040])


def test_best_nodes_keeps_likely_nodes_and_their_ancestors():
    chain = DraftTree.chain(list(range(10)))
    chain.scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.05, 0.04, 0.03, 0.02, 0.01]
    assert best_nodes(chain, CURVE) == [0, 1, 2, 3, 4]  # the tail adds almost nothing but costs rows
    tree = DraftTree([5, 6, 7, 8], [-1, 0, -1, 2], scores=[0.2, 0.9, 0.8, 0.1])  # 6 scored above its parent
    assert best_nodes(tree, CURVE) == [0, 1, 2, 3]  # cheap rows: keep everything
    steep = CostCurve([1, 2, 3], [0.010, 0.0101, 0.030])  # room for one node only
    assert best_nodes(tree, steep) == [2]  # node 1 cannot come without its parent


def test_best_nodes_keeps_what_the_drafter_needs():
    tree = DraftTree([1, 2, 3, 4], [-1, 0, -1, 2], scores=[0.9, 0.8, 0.001, 0.001], keep=[False, False, False, True])
    steep = CostCurve([1, 2, 3, 4], [0.010, 0.0101, 0.030, 0.300])
    kept = tree.subtree(best_nodes(tree, steep))
    assert kept.tokens == [3, 4] and kept.parents == [-1, 0]  # the kept leaf and its parent only
    assert kept.keep == [False, True]
    assert best_nodes(tree, CURVE) == [0, 1, 2, 3]


def test_best_nodes_drops_a_hopeless_draft_and_keeps_a_tree_without_scores():
    hopeless = DraftTree.chain([1, 2, 3])
    hopeless.scores = [0.001, 0.0005, 0.0001]
    assert best_nodes(hopeless, CostCurve([1, 2, 4], [0.01, 0.012, 0.014])) == []
    assert best_nodes(DraftTree.chain([1, 2, 3]), CURVE) == [0, 1, 2]


def test_cost_curve_interpolates():
    assert CURVE.cost(1) == pytest.approx(0.010)
    assert CURVE.cost(12) == pytest.approx(0.0125)
    assert CURVE.cost(128) == pytest.approx(0.080)


def test_ceiling_is_rows_per_cost_at_full_acceptance():
    flat = CostCurve([1, 8], [0.010, 0.010])  # rows free up to 8: 7 drafts, all kept, 8 tokens a step
    assert flat.ceiling(1.0) == (pytest.approx(8.0), 7)
    linear = CostCurve([1, 8], [0.010, 0.080])  # a row costs a step: no draft ever pays
    assert linear.ceiling(1.0) == (1.0, 0) and linear.ceiling(0.5) == (1.0, 0)
    # CURVE: 1 + 0.5 + ... + 0.5^5 tokens for 6 rows costing 1.071 steps beats every other length.
    speedup, drafts = CURVE.ceiling(0.5)
    assert drafts == 5 and speedup == pytest.approx((2 - 0.5**5) / (CURVE.cost(6) / CURVE.cost(1)))
    assert CURVE.ceiling(0.9)[0] > CURVE.ceiling(0.5)[0]
    # Shared by 8 sequences: a draft each doubles the rows of a forward (1.5x its cost), a second
    # triples them (4.3x).
    shared = CostCurve([1, 8, 16, 64], [0.010, 0.011, 0.0165, 0.200])
    assert shared.ceiling(1.0, batch=8) == (pytest.approx(2 / 1.5), 1)
    assert shared.ceiling(0.4, batch=8) == (1.0, 0)  # 1.4 tokens for 1.5x the time
    assert shared.ceiling(1.0)[0] > 2  # alone, rows up to 8 are almost free


def test_drafts_shrink_as_the_batch_sharing_the_forward_grows():
    chain = DraftTree.chain(list(range(10)))
    chain.scores = [0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    alone = len(best_nodes(chain, CURVE))
    # Seven other sequences with 2 rows and 1.5 expected tokens each already share the forward.
    crowded = len(best_nodes(chain, CURVE, other_rows=14, other_tokens=10.5))
    assert best_nodes(chain, CURVE, other_rows=0, other_tokens=0.0) == list(range(alone))
    assert 0 < crowded < alone
