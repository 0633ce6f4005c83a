"""The `suffix` drafter: its counted suffix trie and trees on hand-made token lists, the history it
keeps across requests (bounded, oldest evicted), and exactness on the real model."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.drafters import make_drafter
from fastdecode.drafters.base import DecodeState, StepResult
from fastdecode.drafters.suffix import SuffixDecoding, SuffixTrie
from fastdecode.errors import FastDecodeError

from prompts import EXERCISE, LIGHTHOUSE, ar_answers_fixture


def state(tokens):
    return DecodeState(tokens=list(tokens), num_prompt_tokens=len(tokens), params=SamplingParams())


def paths(tree):
    return sorted([tree.tokens[i] for i in path] for path in tree.paths())


def contents(trie: SuffixTrie) -> Counter:
    """Every string in the trie with its count, read by walking it."""
    found, stack = Counter(), [(0, ())]
    while stack:
        node, string = stack.pop()
        for token, child in trie.children(node):
            assert trie.count[child] > 0
            found[string + (token,)] = trie.count[child]
            stack.append((child, string + (token,)))
    return found


def substrings(seqs, depth) -> Counter:
    """The same by brute force."""
    found = Counter()
    for seq in seqs:
        for i in range(len(seq)):
            for k in range(1, min(depth, len(seq) - i) + 1):
                found[tuple(seq[i : i + k])] += 1
    return found


def build(seqs, depth):
    trie = SuffixTrie(depth)
    for seq in seqs:
        trie.start()
        for token in seq:
            trie.append(token)
    return trie


SEQS = [[1, 2, 3, 1, 2, 3, 1, 2, 4], [2, 3, 5, 2, 3], [7, 7, 7, 7, 7, 7], [1, 2, 3]]


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_trie_counts_every_substring(depth):
    trie = build(SEQS, depth)
    assert contents(trie) == substrings(SEQS, depth)
    assert trie.num_nodes() == len(substrings(SEQS, depth))


def test_trie_remove_and_reuse():
    trie = build(SEQS, 4)
    size = trie.num_nodes()
    trie.remove(SEQS[0])
    trie.remove(SEQS[2])
    assert contents(trie) == substrings([SEQS[1], SEQS[3]], 4)
    trie.start()
    for token in SEQS[0]:
        trie.append(token)
    assert contents(trie) == substrings(SEQS[1:2] + SEQS[3:] + SEQS[:1], 4)
    assert len(trie.count) - 1 == size  # freed slots were reused, no growth
    for seq in SEQS[1:2] + SEQS[3:] + SEQS[:1]:
        trie.remove(seq)
    assert trie.num_nodes() == 0 and contents(trie) == Counter()


def test_continuation_probabilities():
    trie = build([[1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2]], 4)
    node = trie.child(trie.child(0, 1), 2)  # "1 2": followed by 3, 3, 4 and once by nothing
    got = {token: (prob, support) for token, _, prob, support in trie.continuations(node, 4)}
    assert got == {3: (2 / 3, 3), 4: (1 / 3, 3)}
    assert [t for t, *_ in trie.continuations(node, 1)] == [3]  # the most frequent only


def check_tree(tree):
    assert tree.scores is not None and len(tree.scores) == len(tree)
    for i, p in enumerate(tree.parents):
        assert 0 <= tree.scores[i] <= 1
        if p >= 0:
            assert tree.scores[i] <= tree.scores[p]
    for node in [-1] + list(range(len(tree))):
        kids = [tree.tokens[c] for c in tree.children(node)]
        assert len(kids) == len(set(kids))


def test_propose_frequency_weighted_tree():
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 1, 2]
    drafter = SuffixDecoding(max_depth=4, max_match=2, min_score=0)
    drafter.begin(tokens)
    tree = drafter.propose(state(tokens), 64)
    check_tree(tree)
    assert paths(tree) == [[3, 8], [3, 9], [4, 1]]  # "1 2" then up to 4 - 2 more tokens
    assert tree.tokens[0] == 3  # seen twice after "1 2", so first, with the best score
    four = tree.children(-1)[1]
    assert tree.tokens[four] == 4 and tree.scores[0] > tree.scores[four]
    assert len(drafter.propose(state(tokens), 2)) == 2
    assert len(drafter.propose(state(tokens), 0)) == 0
    assert len(drafter.propose(state(tokens + [5]), 64)) == 0  # "5" never seen before


def test_longest_match_wins():
    tokens = [5, 1, 2, 6, 7, 1, 2, 8, 5, 1, 2]  # "1 2" -> 6 or 8, but "5 1 2" -> 6 only
    drafter = SuffixDecoding(max_depth=5, max_match=3, min_score=0)
    drafter.begin(tokens)
    assert paths(drafter.propose(state(tokens), 64)) == [[6, 7]]
    drafter = SuffixDecoding(max_depth=5, max_match=2, min_score=0)
    drafter.begin(tokens)
    assert paths(drafter.propose(state(tokens), 64)) == [[6, 7, 1], [8, 5, 1]]


def test_history_survives_requests():
    drafter = SuffixDecoding(min_score=0)
    drafter.begin([7, 8])
    drafter.propose(state([7, 8, 9]), 8)
    live = drafter._live
    live.extend([10, 11])  # the engine appends the last step's tokens after the last propose
    drafter.begin([7, 8])
    assert paths(drafter.propose(state([7, 8]), 64)) == [[9, 10, 11]]
    fresh = SuffixDecoding(min_score=0)
    fresh.begin([7, 8])
    assert len(fresh.propose(state([7, 8]), 64)) == 0


def test_history_is_bounded_oldest_first():
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]
    drafter = SuffixDecoding(max_depth=4, max_match=2, max_history_tokens=6, min_score=0)
    for prompt in (a, b, c):
        drafter.begin(prompt)
    assert list(drafter.history) == [b] and drafter.history_tokens == 4  # a + b > 6: a evicted
    assert contents(drafter.trie) == substrings([b, c], 4)  # nothing of a is left
    assert paths(drafter.propose(state(c + [5, 6]), 64)) == [[7, 8]]  # b's "5 6 -> 7 8" is
    none = SuffixDecoding(max_history_tokens=0)
    none.begin(a)
    none.begin(b)
    assert contents(none.trie) == substrings([b], none.max_depth)


def test_observe_calibrates_scores():
    tokens = [1, 2, 3, 1, 2, 4, 1, 2]  # after "1 2": 3 or 4, half each
    drafter = SuffixDecoding(max_depth=3, max_match=2, min_score=0)
    drafter.begin(tokens)
    tree = drafter.propose(state(tokens), 64)
    first = tree.scores[tree.children(-1)[0]]
    for _ in range(20):  # the target never takes either
        tree = drafter.propose(state(tokens), 64)
        drafter.observe(StepResult.whole(tree, [], [5], torch.zeros(len(tree) + 1, 10)))
    tree = drafter.propose(state(tokens), 64)
    assert tree.scores[tree.children(-1)[0]] < first / 4
    assert len(SuffixDecoding(max_depth=3, max_match=2).propose(state(tokens), 64)) > 0
    low = SuffixDecoding(max_depth=3, max_match=2)  # default min_score now drops them
    low.stats = drafter.stats
    low.begin(tokens)
    assert len(low.propose(state(tokens), 64)) == 0


@pytest.mark.parametrize(
    "options",
    [{"max_depth": 1}, {"max_match": 24}, {"max_depth": 8, "max_match": 8}, {"max_match": 0}, {"max_children": 0},
     {"max_history_tokens": -1}, {"min_score": 1.0}, {"max_depth": "8"}],
)
def test_invalid_options(options):
    with pytest.raises(FastDecodeError, match="suffix"):
        make_drafter("suffix", **options)


# --- the real model -------------------------------------------------------------------------------

REPEAT, QUESTION = LIGHTHOUSE, EXERCISE
PARAMS = SamplingParams(max_new_tokens=64)
reference = ar_answers_fixture(REPEAT, QUESTION, PARAMS)


@pytest.mark.slow
def test_repetitive_prompt_is_exact_and_accepted(llm, reference):
    result = llm.generate(REPEAT, PARAMS, method="suffix")
    ar = reference[REPEAT]
    assert result.token_ids == ar.token_ids and result.text == ar.text
    s = result.stats
    assert s.drafts > 0 and s.accepted_tokens > 0
    assert s.forward_passes < ar.stats.forward_passes / 2
    assert s.mean_acceptance_length > 2


@pytest.mark.slow
def test_repeated_answer_is_drafted_from_history(llm, reference):
    """Asked again, the answer is in the drafter's history: far more of it is accepted."""
    drafter = make_drafter("suffix")
    ids = llm.prompt_ids(QUESTION)
    first = llm.engine.generate(ids, PARAMS, drafter)
    second = llm.engine.generate(ids, PARAMS, drafter)
    ar = reference[QUESTION]
    assert first.token_ids == second.token_ids == ar.token_ids
    assert first.stats.forward_passes <= ar.stats.forward_passes
    assert second.stats.mean_acceptance_length > first.stats.mean_acceptance_length + 1
    assert second.stats.forward_passes < first.stats.forward_passes / 2
