"""`auto`'s merge on hand-made member trees: shared nodes, who proposed what, the results each member
gets back in its own node numbers, and how many nodes it asks of its members."""
from __future__ import annotations

import torch

from fastdecode import SamplingParams
from types import SimpleNamespace

from fastdecode.drafters.auto import FULL_EVERY, MIN_ASK, RECENT_STEPS, Auto
from fastdecode.drafters.base import DecodeState, StepResult
from fastdecode.runtime.cost_curve import CostCurve
from fastdecode.runtime.tree import DraftTree

STATE = DecodeState(tokens=[1, 2, 3], num_prompt_tokens=3, params=SamplingParams())


class Member:
    """Proposes a fixed tree, cut to the budget it is given; records what it was asked and told."""

    def __init__(self, name: str, tree: DraftTree):
        self.name, self.tree, self.asked, self.results = name, tree, [], []

    def begin(self, prompt_ids):
        pass

    def propose(self, state, budget):
        self.asked.append(budget)
        return self.tree if len(self.tree) <= budget else self.tree.subtree(list(range(budget)))

    def observe(self, result):
        self.results.append(result)


def auto_of(*members: Member) -> Auto:
    auto = Auto(members="ngram,suffix")
    auto.members, auto._columns = list(members), [[] for _ in members]
    return auto


def test_agreeing_nodes_are_one_node_and_each_member_hears_its_own_result():
    one = Member("one", DraftTree([5, 6], [-1, 0], scores=[0.9, 0.8]))
    two = Member("two", DraftTree([5, 7], [-1, 0], scores=[0.6, 0.3]))
    auto = auto_of(one, two)
    tree = auto.propose(STATE, 60)
    assert (tree.tokens, tree.parents) == ([5, 6, 7], [-1, 0, 0])
    assert tree.sources == ["one+two", "one", "two"]
    assert tree.scores[0] >= tree.scores[1] > tree.scores[2]  # the agreed node is likelier than either alone
    # The engine verified the shared node and member one's child; the target took both.
    auto.observe(StepResult(tree, [1, 2, -1], [0, 1], [5, 6, 9], torch.zeros(3, 10)))
    assert one.results[-1].rows == [1, 2] and one.results[-1].accepted == [0, 1]
    assert two.results[-1].rows == [1, -1] and two.results[-1].accepted == [0]


def test_members_are_asked_for_twice_the_most_nodes_lately_kept():
    chain = DraftTree(list(range(10, 40)), list(range(-1, 29)), scores=[0.99**k for k in range(1, 31)])
    one = Member("one", chain)
    auto = auto_of(one)
    tree = auto.propose(STATE, 60)
    assert one.asked == [2 * MIN_ASK] and len(tree) == 2 * MIN_ASK
    auto.observe(StepResult.whole(tree, list(range(len(tree))), tree.tokens + [0], torch.zeros(len(tree) + 1, 50)))
    auto.propose(STATE, 60)
    assert one.asked[-1] == 2 * len(tree)  # all of it paid: ask for more
    assert auto.propose(STATE, 20) and one.asked[-1] == 20  # never over the budget
    for _ in range(RECENT_STEPS):  # then steps that keep one node each
        small = auto.propose(STATE, 60)
        auto.observe(StepResult(small, [1] + [-1] * (len(small) - 1), [], [0], torch.zeros(2, 50)))
    auto.propose(STATE, 60)
    assert one.asked[-1] == MIN_ASK


def run_steps(auto: Auto, steps: int, path_of) -> None:
    """Propose and accept, step after step, the path path_of(step, tree) of the merged tree."""
    for step in range(steps):
        tree = auto.propose(STATE, 60)
        path = path_of(step, tree)
        auto.observe(StepResult.whole(tree, path, [tree.tokens[n] for n in path] + [0], torch.zeros(len(tree) + 1, 50)))


def test_a_member_that_adds_nothing_rests_between_full_steps():
    """Two members that always agree: the second adds no accepted node, so after the first quarter
    window of full steps it proposes nothing (asked for 0 nodes: it only follows the text), except
    on one step in FULL_EVERY, where every member proposes and what each adds is measured again."""
    one = Member("one", DraftTree([5, 6], [-1, 0], scores=[0.9, 0.8]))
    two = Member("two", DraftTree([5, 6], [-1, 0], scores=[0.9, 0.8]))
    auto = auto_of(one, two)
    auto.target = SimpleNamespace(cost_curve=CostCurve([1, 2], [0.01, 0.02]))
    warm = RECENT_STEPS // 4
    run_steps(auto, warm + 3 * FULL_EVERY, lambda step, tree: [0, 1])
    assert all(one.asked) and all(two.asked[:warm])
    rests = [step for step, asked in enumerate(two.asked) if not asked]
    full = [step for step in range(warm, len(two.asked)) if (step + 1) % FULL_EVERY == 0]
    assert rests == [step for step in range(warm, len(two.asked)) if step not in full]
    assert len(one.results) == len(two.results) == len(one.asked)  # both hear every result
    # While two rests, one's tree is verified as one proposed it: its own scores, its name.
    alone = auto.propose(STATE, 60)
    assert not two.asked[-1]
    assert (alone.tokens, alone.parents, alone.scores, alone.sources) == ([5, 6], [-1, 0], [0.9, 0.8], ["one", "one"])
    auto.observe(StepResult(alone, [1, -1], [0], [5, 9], torch.zeros(2, 50)))
    assert one.results[-1].rows == [1, -1] and one.results[-1].accepted == [0]
    assert two.results[-1].tree.tokens == [] and two.results[-1].new_tokens == [5, 9]


def test_a_member_whose_nodes_are_accepted_alone_keeps_proposing():
    one = Member("one", DraftTree([5, 6], [-1, 0], scores=[0.9, 0.8]))
    two = Member("two", DraftTree([8], [-1], scores=[0.5]))
    auto = auto_of(one, two)
    auto.target = SimpleNamespace(cost_curve=CostCurve([1, 2], [0.01, 0.02]))
    # every other step the target continues with two's token
    run_steps(auto, RECENT_STEPS, lambda step, tree: [0, 1] if step % 2 else [tree.tokens.index(8)])
    assert all(one.asked) and all(two.asked)
