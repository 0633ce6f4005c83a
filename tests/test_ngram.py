"""The `ngram` drafter: its n-gram index and trees on hand-made token lists, and exactness on the
real model (greedy output identical to `ar`)."""
from __future__ import annotations

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.drafters import make_drafter
from fastdecode.drafters.base import DecodeState, StepResult
from fastdecode.drafters.ngram import ALTERNATIVE, LEADING, PRIOR, NGram, NGramIndex
from fastdecode.errors import FastDecodeError

from prompts import EXERCISE, LIGHTHOUSE, ar_answers_fixture

TOKENS = [1, 2, 3, 1, 2, 4, 1, 2]  # "1 2" was followed by 3, then by 4


def state(tokens):
    return DecodeState(tokens=list(tokens), num_prompt_tokens=len(tokens), params=SamplingParams())


def paths(tree):
    return sorted([tree.tokens[i] for i in path] for path in tree.paths())


def check_tree(tree):
    assert tree.scores is not None and len(tree.scores) == len(tree)
    for i, p in enumerate(tree.parents):
        assert 0 <= tree.scores[i] <= 1
        if p >= 0:
            assert tree.scores[i] <= tree.scores[p]
    for node in [-1] + list(range(len(tree))):
        kids = [tree.tokens[c] for c in tree.children(node)]
        assert len(kids) == len(set(kids)), "siblings must carry distinct tokens"


def test_index_known_positions():
    index = NGramIndex(1, 3)
    index.update(TOKENS)
    assert index.positions[(1, 2)] == [2, 5]  # the last "1 2" has no continuation yet
    assert index.positions[(1,)] == [1, 4, 7]
    assert index.positions[(2, 3)] == [3]
    assert (4, 1, 2) not in index.positions
    assert index.matches(TOKENS, 8) == [(2, 5), (2, 2)]  # longest n, most recent first, no repeats
    assert index.matches(TOKENS, 1) == [(2, 5)]


def test_index_incremental_equals_batch():
    tokens = [5, 6, 5, 6, 7, 5, 6, 7, 8, 5]
    grown = NGramIndex(1, 4)
    for end in range(1, len(tokens) + 1):
        grown.update(tokens[:end])
    batch = NGramIndex(1, 4)
    batch.update(tokens)
    assert grown.positions == batch.positions
    assert grown.matches(tokens, 8) == batch.matches(tokens, 8) == [(1, 6), (1, 3), (1, 1)]


def test_tree_of_two_matches():
    drafter = NGram(min_score=0)  # keep every node, whatever its score
    drafter.begin(TOKENS[:3])
    tree = drafter.propose(state(TOKENS), 64)
    check_tree(tree)
    assert paths(tree) == [[3, 1, 2, 4, 1, 2], [4, 1, 2]]
    assert tree.tokens[0] == 4  # the most recent match leads
    second = tree.children(-1)[1]
    assert tree.tokens[second] == 3 and tree.scores[0] > tree.scores[second]
    assert paths(NGram(max_depth=2, min_score=0).propose(state(TOKENS), 64)) == [[3, 1], [4, 1]]
    assert paths(NGram(max_matches=1, min_score=0).propose(state(TOKENS), 64)) == [[4, 1, 2]]


def test_agreeing_matches_share_a_path():
    tokens = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6]
    tree = NGram(max_depth=3, min_score=0).propose(state(tokens), 64)
    check_tree(tree)
    assert paths(tree) == [[7, 8, 5], [7, 9, 5]]
    assert tree.tokens[0] == 7 and tree.children(-1) == [0]  # one root child, supported twice


def test_budget_and_no_match():
    drafter = NGram(min_score=0)
    assert len(drafter.propose(state(TOKENS), 0)) == 0
    tree = drafter.propose(state(TOKENS), 4)
    assert len(tree) == 4
    check_tree(tree)  # DraftTree itself checks that every parent comes first
    assert len(drafter.propose(state([1, 2, 3, 4, 5]), 64)) == 0
    assert len(NGram(min_ngram=3).propose(state(TOKENS), 64)) == 0  # only "1 2" repeats


def test_a_small_budget_gives_the_best_nodes_of_a_large_one():
    """Continuations are only followed as deep as the budget: deeper nodes never make the cut."""
    tokens = [7, 8, 9, 10, 11, 12, 13] * 3 + [7, 8, 9, 5, 6, 7, 8]
    drafter = NGram(min_score=0)
    full = drafter.propose(state(tokens), 64)
    assert max(full.depths()) > 4
    for budget in (1, 2, 3, 4):
        small = drafter.propose(state(tokens), budget)
        head = full.subtree(list(range(budget)))
        assert (small.tokens, small.parents, small.scores) == (head.tokens, head.parents, head.scores)


def test_observe_learns_from_a_cut_proposal():
    drafter = NGram(min_score=0)
    tree = drafter.propose(state(TOKENS), 64)
    alt = tree.children(-1)[1]  # the "3" branch
    leading_key, alt_key = drafter._keys[0], drafter._keys[alt]
    assert leading_key[2] == LEADING and alt_key[2] == ALTERNATIVE
    before = drafter.stats.rate(alt_key, PRIOR[ALTERNATIVE]), drafter.stats.rate(leading_key, PRIOR[LEADING])
    # The engine verified only the first node of each branch and the child of the "3"; the target took the "3".
    kept = sorted([0, alt, tree.children(alt)[0]])
    rows = [kept.index(i) + 1 if i in kept else -1 for i in range(len(tree))]
    logits = torch.zeros(len(kept) + 1, 10)
    drafter.observe(StepResult(tree, rows, [alt], [3, 1], logits))
    assert drafter.stats.rate(alt_key, PRIOR[ALTERNATIVE]) > before[0]
    assert drafter.stats.rate(leading_key, PRIOR[LEADING]) < before[1]
    assert drafter.stats.trials(alt_key) == 1 and drafter.stats.trials(leading_key) == 1
    # The "1" under the accepted "3" had its parent accepted but was not: one more trial.
    assert sum(drafter.stats.trials(k) for k in set(drafter._keys)) == 3
    # Scores follow the statistics: the alternative branch now leads the tree.
    again = drafter.propose(state(TOKENS), 64)
    assert again.tokens[0] == 3


@pytest.mark.parametrize(
    "options",
    [{"min_ngram": 0}, {"max_ngram": 1, "min_ngram": 2}, {"max_matches": 0}, {"max_depth": 0},
     {"min_score": 1.5}, {"max_ngram": 2.5}],
)
def test_invalid_options(options):
    with pytest.raises(FastDecodeError, match="ngram"):
        make_drafter("ngram", **options)


def test_unknown_option():
    with pytest.raises(FastDecodeError, match="bogus_option"):
        make_drafter("ngram", bogus_option=3)


# --- the real model -------------------------------------------------------------------------------

REPEAT, QUESTION = LIGHTHOUSE, EXERCISE
PARAMS = SamplingParams(max_new_tokens=64)
reference = ar_answers_fixture(REPEAT, QUESTION, PARAMS)


@pytest.mark.slow
def test_repetitive_prompt_is_exact_and_accepted(llm, reference):
    result = llm.generate(REPEAT, PARAMS, method="ngram")
    ar = reference[REPEAT]
    assert result.token_ids == ar.token_ids
    assert result.text == ar.text and result.method == "ngram"
    s = result.stats
    assert s.drafts > 0 and s.accepted_tokens > 0
    assert s.forward_passes < ar.stats.forward_passes / 2  # the paragraph is copied from the prompt
    assert s.mean_acceptance_length > 2


@pytest.mark.slow
def test_question_is_exact(llm, reference):
    result = llm.generate(QUESTION, PARAMS, method="ngram", max_ngram=3, min_ngram=2)
    assert result.token_ids == reference[QUESTION].token_ids
    assert result.stats.forward_passes <= reference[QUESTION].stats.forward_passes


@pytest.mark.slow
def test_one_instance_serves_several_requests(llm, reference):
    drafter = make_drafter("ngram")
    for prompt in (QUESTION, REPEAT):
        result = llm.engine.generate(llm.prompt_ids(prompt), SamplingParams(max_new_tokens=24), drafter)
        assert result.token_ids == reference[prompt].token_ids[:24]
