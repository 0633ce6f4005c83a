"""Token Recycling: the template, the adjacency matrix, the trees it drafts, exactness on the real model."""
from __future__ import annotations

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.drafters import make_drafter
from fastdecode.drafters.base import DecodeState, StepResult
from fastdecode.drafters.recycling import MAX_TREE_SIZE, RANK_PRIOR, TEMPLATE, TOP_K, TokenRecycling
from fastdecode.errors import FastDecodeError
from fastdecode.runtime.tree import DraftTree
from fastdecode.runtime.verify import verify_greedy

from prompts import FOX, SEASONS

VOCAB = 20
# A fake target whose ranking of the next token depends on the last token only: ORDERS[t] best first.
ORDERS = {
    3: [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0, 1, 2, 3, 4],
    5: [6, 12, 0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19],
    6: [11, 19, 18, 17, 16, 15, 14, 13, 12, 10, 9, 8, 7, 5, 4, 3, 2, 1, 0, 6],
    11: [3, 1, 2, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19, 0, 11],
}


def logits_after(tokens: list[int]) -> torch.Tensor:
    """[len(tokens), VOCAB] logits ranking ORDERS[t] (t = the row's token; reversed order if unknown)."""
    out = torch.zeros(len(tokens), VOCAB)
    for r, t in enumerate(tokens):
        order = ORDERS.get(t, list(range(VOCAB - 1, -1, -1)))
        for rank, token in enumerate(order):
            out[r, token] = float(VOCAB - rank)
    return out


def state(tokens: list[int]) -> DecodeState:
    return DecodeState(tokens=list(tokens), num_prompt_tokens=1, params=SamplingParams())


def step(drafter: TokenRecycling, tokens: list[int], budget: int = 64) -> tuple[DraftTree, list[int]]:
    """One decode step against the fake target: propose, verify greedily, observe. Returns the tree
    and the tokens it produced (accepted + bonus)."""
    tree = drafter.propose(state(tokens), budget)
    logits = logits_after([tokens[-1]] + tree.tokens)
    path, bonus = verify_greedy(tree, logits)
    new = [tree.tokens[n] for n in path] + [bonus]
    drafter.observe(StepResult.whole(tree, path, new, logits))
    return tree, new


def test_template_is_a_best_first_tree():
    assert len(TEMPLATE) == MAX_TREE_SIZE
    assert TEMPLATE[:4] == [(-1, 0, 0.5), (0, 0, 0.25), (-1, 1, 0.125), (1, 0, 0.125)]
    ranks_seen: dict[int, list[int]] = {}
    for position, (parent, rank, prior) in enumerate(TEMPLATE):
        assert -1 <= parent < position
        parent_prior = 1.0 if parent < 0 else TEMPLATE[parent][2]
        assert prior == pytest.approx(parent_prior * RANK_PRIOR[rank])
        ranks_seen.setdefault(parent, []).append(rank)
    # Any prefix is usable: priors never rise, and each node's children take ranks 0, 1, 2, ... in order.
    assert all(a[2] >= b[2] for a, b in zip(TEMPLATE, TEMPLATE[1:]))
    assert all(ranks == list(range(len(ranks))) for ranks in ranks_seen.values())
    assert max(len(r) for r in ranks_seen.values()) <= TOP_K


def test_observe_fills_adjacency_with_top_k_of_every_row():
    d = TokenRecycling()
    d.begin([1, 2, 3])
    assert d.propose(state([1, 2, 3]), 10) == DraftTree()  # nothing known yet
    tree = DraftTree([5, 6], [-1, 0])
    d.observe(StepResult.whole(tree, [0], [5, 6], logits_after([3, 5, 6])))
    assert d.adjacency.shape == (VOCAB, TOP_K)
    assert d.adjacency[3].tolist() == ORDERS[3][:TOP_K]  # row 0: the root
    assert d.adjacency[5].tolist() == ORDERS[5][:TOP_K]
    assert d.adjacency[6].tolist() == ORDERS[6][:TOP_K]
    unknown = [t for t in range(VOCAB) if t not in (3, 5, 6)]
    assert (d.adjacency[unknown] == -1).all()


def test_accepted_row_wins_for_a_repeated_token():
    d = TokenRecycling()
    d.begin([3])
    d.propose(state([3]), 10)
    tree = DraftTree([5, 11, 5], [-1, 0, 1])  # token 5 twice: node 0 (accepted) and node 2
    logits = logits_after([3, 5, 11, 5])
    logits[3] = logits_after([6])[0]  # node 2's row says something else
    d.observe(StepResult.whole(tree, [0], [5, 6], logits))
    assert d.adjacency[5].tolist() == ORDERS[5][:TOP_K]


def test_propose_walks_the_template():
    d = TokenRecycling(tree_size=4)
    d.begin([3])
    d.propose(state([3]), 10)
    d.observe(StepResult.whole(DraftTree([5, 6], [-1, 0]), [], [5], logits_after([3, 5, 6])))
    # Template: 0 = rank 0 of root, 1 = rank 0 of 0, 2 = rank 1 of root, 3 = rank 0 of 1.
    tree = d.propose(state([3]), 10)
    assert tree.tokens == [5, 6, 6, 11] and tree.parents == [-1, 0, -1, 1]
    assert d.propose(state([3]), 2).tokens == [5, 6]  # the budget takes a prefix
    assert d.propose(state([3]), 0) == DraftTree()
    # From root 5: 6 -> 11, then 11's successors are unknown (-1), so its child is left out.
    tree = d.propose(state([5]), 10)
    assert tree.tokens == [6, 11, 12] and tree.parents == [-1, 0, -1]
    assert len(d.propose(state([7]), 10)) == 0  # an unknown root proposes nothing


def test_siblings_are_distinct_and_scores_fall_along_paths():
    d = TokenRecycling(tree_size=MAX_TREE_SIZE)
    d.begin([3])
    tokens = [3]
    for _ in range(6):
        tree, new = step(d, tokens)
        tokens += new
    tree = d.propose(state(tokens), 64)
    assert len(tree) > 4
    for node in [-1] + list(range(len(tree))):
        kids = [tree.tokens[c] for c in tree.children(node)]
        assert len(kids) == len(set(kids))
    for i, p in enumerate(tree.parents):
        assert 0 < tree.scores[i] <= (1.0 if p < 0 else tree.scores[p])


def test_learns_a_bigram_target_and_its_statistics():
    """The fake target cycles 3 -> 5 -> 6 -> 11 -> 3: once the matrix has seen each token, every
    step accepts the whole top-1 chain of the template, and the rank-0 estimates rise while the
    rank-1 ones fall."""
    d = TokenRecycling(tree_size=8)
    d.begin([3])
    tokens = [3]
    for _ in range(4):  # one token per step until each of the four tokens has been a verified row
        tokens += step(d, tokens)[1]
    assert tokens == [3, 5, 6, 11, 3]

    def top1_path(position: int) -> bool:
        while position >= 0 and TEMPLATE[position][1] == 0:
            position = TEMPLATE[position][0]
        return position < 0

    chain = sum(top1_path(p) for p in range(8))
    assert chain == 4
    for _ in range(20):
        tree, new = step(d, tokens)
        assert len(new) == chain + 1
        tokens += new
    assert all(b == {3: 5, 5: 6, 6: 11, 11: 3}[a] for a, b in zip(tokens, tokens[1:]))
    assert d.stats.rate(0, RANK_PRIOR[0]) > 0.9  # rank 0 under the root: always accepted
    assert d.stats.rate(2, RANK_PRIOR[1]) < RANK_PRIOR[1] / 2  # rank 1 under the root: never


def test_matrix_and_statistics_persist_across_requests():
    d = TokenRecycling()
    d.begin([3])
    step(d, [3])
    known = d.adjacency.clone()
    d.begin([9, 9])
    assert torch.equal(d.adjacency, known)
    assert d.propose(state([9, 3]), 10).tokens[:1] == [5]


@pytest.mark.parametrize("size", [0, MAX_TREE_SIZE + 1, "8", 2.0, True])
def test_invalid_tree_size(size):
    with pytest.raises(FastDecodeError, match="tree_size"):
        make_drafter("recycling", tree_size=size)


def test_unknown_option_is_a_clear_error():
    with pytest.raises(FastDecodeError, match="recycling"):
        make_drafter("recycling", window=4)


# ---- the real model ------------------------------------------------------------------------------

REPEAT, QUESTION = FOX, SEASONS


def checked(drafter: TokenRecycling) -> TokenRecycling:
    """Wrap propose() to check every tree it makes: budget, distinct siblings, scores."""
    propose = drafter.propose

    def wrapped(state, budget):
        tree = propose(state, budget)
        assert len(tree) <= budget and (tree.scores is not None or len(tree) == 0)
        for node in [-1] + list(range(len(tree))):
            kids = [tree.tokens[c] for c in tree.children(node)]
            assert len(kids) == len(set(kids))
        for i, p in enumerate(tree.parents):
            assert 0 <= tree.scores[i] <= (1.0 if p < 0 else tree.scores[p])
        return tree

    drafter.propose = wrapped
    return drafter


def test_greedy_output_equals_ar_on_a_question(llm):
    prompt = QUESTION
    params = SamplingParams(max_new_tokens=64)
    ar = llm.generate(prompt, params, method="ar")
    result = llm.generate(prompt, params, method="recycling")
    assert result.token_ids == ar.token_ids
    assert result.method == "recycling"


def test_repetitive_prompt_exact_accepting_and_hot_start(llm):
    params = SamplingParams(max_new_tokens=64)
    ids = llm.prompt_ids(REPEAT)
    ar = llm.engine.generate(ids, params, make_drafter("ar"))
    drafter = checked(make_drafter("recycling"))
    first = llm.engine.generate(ids, params, drafter)
    assert first.token_ids == ar.token_ids
    # A cold matrix drafts little; the same instance serves the next request with the matrix it filled.
    second = llm.engine.generate(ids, params, drafter)
    assert second.token_ids == ar.token_ids
    assert second.stats.drafts > 0 and second.stats.accepted_tokens > 0
    assert second.stats.forward_passes < min(first.stats.forward_passes, ar.stats.forward_passes)
