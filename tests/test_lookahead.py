"""Lookahead decoding: the window as a tree, the Jacobi update, the n-gram pool, exactness on the real model."""
from __future__ import annotations

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.drafters import make_drafter
from fastdecode.drafters.base import DecodeState, StepResult
from fastdecode.drafters.lookahead import MIN_WINDOW_SCORE, POOL_PER_TOKEN, Lookahead
from fastdecode.errors import FastDecodeError
from fastdecode.runtime.tree import DraftTree

from prompts import FOX, SEASONS

VOCAB = 40
A, B, C, D, E, F, G, H, I = range(10, 19)  # noqa: E741  window tokens
ROOT = 1


def state(tokens: list[int]) -> DecodeState:
    return DecodeState(tokens=list(tokens), num_prompt_tokens=1, params=SamplingParams())


def logits_with_argmax(best: list[int]) -> torch.Tensor:
    """[len(best), VOCAB] logits whose row r has its maximum at best[r]."""
    out = torch.zeros(len(best), VOCAB)
    out[torch.arange(len(best)), torch.tensor(best)] = 1.0
    return out


def full_window() -> Lookahead:
    """W=3, N=4 with the three levels set by hand: level 0 = A B C, level 1 = D E F, level 2 = G H I."""
    d = Lookahead(window=3, ngram=4, max_candidates=2)
    d.begin([ROOT])
    d.levels = [[A, B, C], [D, E, F], [G, H, I]]
    return d


def path_tokens(tree: DraftTree, node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(tree.tokens[node])
        node = tree.parents[node]
    return out[::-1]


def test_window_columns_and_tree():
    d = full_window()
    assert d.columns() == [[A, D, G], [A, B, E, H], [A, B, C, F, I]]
    tree = d.propose(state([ROOT]), 64)
    # One subtree: the level-0 spine A-B-C, a branch of later levels hanging off each spine node.
    assert tree.tokens == [A, D, G, B, E, H, C, F, I]
    assert tree.parents == [-1, 0, 1, 0, 3, 4, 3, 6, 7]
    assert all(s >= MIN_WINDOW_SCORE for s in tree.scores)
    for i, p in enumerate(tree.parents):
        assert tree.scores[i] <= (1.0 if p < 0 else tree.scores[p])


def test_jacobi_update_and_harvest():
    d = full_window()
    tree = d.propose(state([ROOT]), 64)
    # Column ends are nodes 2 (G), 5 (H), 8 (I): rows 3, 6, 9 predict X, Y, Z. Other rows: token 0.
    X, Y, Z = 30, 31, 32
    best = [0] * (len(tree) + 1)
    best[3], best[6], best[9] = X, Y, Z
    d.observe(StepResult.whole(tree, [], [0], logits_with_argmax(best)))
    assert d.levels == [[D, E, F], [G, H, I], [X, Y, Z]]
    assert d.candidates(A) == [(D, G, X)]
    assert d.candidates(B) == [(E, H, Y)]
    assert d.candidates(C) == [(F, I, Z)]
    assert d.pool_size == 3


def test_warm_up_fills_levels_before_harvesting():
    d = Lookahead(window=3, ngram=4)
    prompt = [5, 6, 7, 8]
    d.begin(prompt)
    assert len(d.levels) == 1 and len(d.levels[0]) == 3 and set(d.levels[0]) <= set(prompt)
    for n_levels in (2, 3):
        tree = d.propose(state([ROOT]), 64)
        assert max(tree.depths()) == 3 + n_levels - 2  # the spine plus the levels so far
        d.observe(StepResult.whole(tree, [], [0], logits_with_argmax([20 + n_levels] * (len(tree) + 1))))
        assert len(d.levels) == n_levels and d.levels[-1] == [20 + n_levels] * 3
        assert d.pool_size == 0
    tree = d.propose(state([ROOT]), 64)
    d.observe(StepResult.whole(tree, [], [0], logits_with_argmax([25] * (len(tree) + 1))))
    assert d.pool_size > 0 and len(d.levels) == 3


def test_pool_candidates_lead_the_tree():
    d = full_window()
    d.add_ngram((ROOT, 20, 21, 22))
    d.add_ngram((ROOT, 20, 23, 24))
    d.add_ngram((ROOT, 25, 26, 27))  # the most recent first; max_candidates = 2 keeps two
    assert d.candidates(ROOT) == [(25, 26, 27), (20, 23, 24)]
    tree = d.propose(state([7, ROOT]), 64)
    assert tree.tokens[:6] == [25, 26, 27, 20, 23, 24]
    assert tree.parents[:6] == [-1, 0, 1, -1, 3, 4]
    assert len(tree) == 6 + 9  # the window follows
    assert tree.scores[0] > tree.scores[1] > tree.scores[2] > 0
    # A proposal sharing a prefix is merged, never duplicated among siblings.
    d.add_ngram((ROOT, 20, 23, 28))
    d.add_ngram((ROOT, 20, 23, 24))  # harvested again: the most recent, then (20, 23, 28)
    tree = d.propose(state([ROOT]), 64)
    assert [path_tokens(tree, n) for n in range(4)] == [[20], [20, 23], [20, 23, 24], [20, 23, 28]]
    for node in [-1] + list(range(len(tree))):
        kids = [tree.tokens[c] for c in tree.children(node)]
        assert len(kids) == len(set(kids))


def test_pool_is_bounded_and_recency_ordered():
    d = Lookahead(max_candidates=3)
    for i in range(POOL_PER_TOKEN + 5):
        d.add_ngram((ROOT, 100 + i, 0, 0))
    assert d.pool_size == POOL_PER_TOKEN == len(d.pool[ROOT])
    assert (105, 0, 0) in d.pool[ROOT] and (104, 0, 0) not in d.pool[ROOT]
    d.add_ngram((ROOT, 110, 0, 0))  # harvested again: the most recent now
    assert d.candidates(ROOT)[0] == (110, 0, 0)
    assert d.pool_size == POOL_PER_TOKEN


def test_a_cut_window_updates_only_what_was_verified():
    d = full_window()
    tree = d.propose(state([ROOT]), 64)
    rows = [1, 2, 3, 4] + [-1] * (len(tree) - 4)  # only column 0 (A D G) and the spine node B were verified
    d.observe(StepResult(tree, rows, [], [0], logits_with_argmax([0, 0, 0, 30, 0])))
    assert d.levels == [[D, E, F], [G, H, I], [30, H, I]]  # columns 1, 2 keep their last guess
    assert d.pool_size == 1 and d.candidates(A) == [(D, G, 30)]


def test_budget_and_statistics():
    d = full_window()
    assert len(d.propose(state([ROOT]), 5)) == 5
    assert len(d.propose(state([ROOT]), 0)) == 0
    d.add_ngram((ROOT, 20, 21, 22))
    prior = d.propose(state([ROOT]), 64).scores[0]
    for _ in range(10):  # the pool's first token is always accepted, its second never
        tree = d.propose(state([ROOT]), 64)
        best = [0] * (len(tree) + 1)
        best[0] = 20
        d.observe(StepResult.whole(tree, [0], [20, 0], logits_with_argmax(best)))
        d.levels = [[A, B, C], [D, E, F], [G, H, I]]  # undo the Jacobi step: the same tree each time
        d.pool, d.pool_size = {}, 0
        d.add_ngram((ROOT, 20, 21, 22))
    tree = d.propose(state([ROOT]), 64)
    assert tree.tokens[:3] == [20, 21, 22]
    assert tree.scores[0] > prior > tree.scores[1]


@pytest.mark.parametrize(
    "options, match",
    [({"window": 0}, "window"), ({"ngram": 1}, "ngram"), ({"max_candidates": -1}, "max_candidates"),
     ({"window_score": 2.0}, "window_score"), ({"window": "4"}, "window"), ({"seed": 1.5}, "seed")],
)
def test_invalid_options(options, match):
    with pytest.raises(FastDecodeError, match=match):
        make_drafter("lookahead", **options)


# ---- the real model ------------------------------------------------------------------------------

REPEAT, QUESTION = FOX, SEASONS


@pytest.fixture(scope="module")
def ar_repeat(llm):
    return llm.engine.generate(llm.prompt_ids(REPEAT), SamplingParams(max_new_tokens=64), make_drafter("ar"))


def test_greedy_output_equals_ar_on_a_question(llm):
    params = SamplingParams(max_new_tokens=64)
    ar = llm.generate(QUESTION, params, method="ar")
    result = llm.generate(QUESTION, params, method="lookahead")
    assert result.token_ids == ar.token_ids
    assert result.method == "lookahead"


@pytest.mark.parametrize("options", [{}, {"window": 3, "ngram": 3, "max_candidates": 2}])
def test_repetitive_prompt_exact_and_accepting(llm, ar_repeat, options):
    drafter = make_drafter("lookahead", **options)
    trees = []
    propose = drafter.propose
    drafter.propose = lambda state, budget: trees.append(propose(state, budget)) or trees[-1]
    result = llm.engine.generate(llm.prompt_ids(REPEAT), SamplingParams(max_new_tokens=64), drafter)
    assert result.token_ids == ar_repeat.token_ids
    assert result.stats.drafts > 0 and result.stats.accepted_tokens > 0
    assert drafter.pool_size > 0
    for tree in trees:
        for node in [-1] + list(range(len(tree))):
            kids = [tree.tokens[c] for c in tree.children(node)]
            assert len(kids) == len(set(kids))
        for i, p in enumerate(tree.parents):
            assert 0 <= tree.scores[i] <= (1.0 if p < 0 else tree.scores[p])
