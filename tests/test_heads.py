"""Trained draft heads (heads/) and their drafters, on the tiny random-weight model: the drafting
computation is the trained one, training lowers the loss, files are checked on load, and a
drafter with any head (even an untrained one) is lossless."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastdecode.drafters import make_drafter
from fastdecode.drafters.base import DecodeState, StepResult, Target
from fastdecode.errors import FastDecodeError
from fastdecode.heads import HEAD_KINDS, load_head, make_head, save_head
from fastdecode.models.llama import LlamaModel
from fastdecode.runtime.sampling import SamplingParams

from conftest import TINY, byte_tokenizer, tiny_weights

DRAFT_IDS = list(range(0, 97, 2)) + [1, 3]  # a draft vocabulary that misses some tokens


@dataclass
class TinyTokenizer:
    eos_ids: frozenset = frozenset({96})


def tiny_target(seed: int = 0) -> Target:
    return Target(LlamaModel(TINY, tiny_weights(seed=seed), torch.float32), TinyTokenizer(), "tiny")


def teacher_batch(model, head, sequences: list[list[int]]) -> dict:
    """What the training pipeline stores, for a few sequences: states at the head's layers and the
    target's own top-8 next-token distribution at every position."""
    T = max(map(len, sequences))
    batch = {"tokens": torch.zeros(len(sequences), T, dtype=torch.long), "mask": torch.zeros(len(sequences), T, dtype=torch.bool),
             "hidden": torch.zeros(len(sequences), T, len(head.train_layers), TINY.hidden_size),
             "top_ids": torch.zeros(len(sequences), T, 8, dtype=torch.long), "top_probs": torch.zeros(len(sequences), T, 8)}
    for b, seq in enumerate(sequences):
        n = len(seq)
        logits, hidden = model.forward(torch.tensor(seq), torch.arange(n), model.new_cache(n), capture=head.train_layers)
        top = torch.softmax(logits, -1).topk(8)
        batch["tokens"][b, :n] = torch.tensor(seq)
        batch["hidden"][b, :n] = hidden
        batch["top_ids"][b, :n], batch["top_probs"][b, :n] = top.indices, top.values
        batch["mask"][b, 2 : n - 1] = True
    return batch


def random_sequences(count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (length,), generator=g).tolist() for _ in range(count)]


def saved_head(tmp_path, kind: str, target: Target, train_steps: int = 0):
    head = make_head(kind, target.model, DRAFT_IDS)
    if train_steps:
        batch = teacher_batch(target.model, head, random_sequences(4, 24))
        opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
        for _ in range(train_steps):
            loss, _ = head.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save_head(head, tmp_path / kind, {"target": {"model": "tiny"}}), head


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_training_lowers_the_loss_and_raises_acceptance(kind):
    target = tiny_target()
    torch.manual_seed(0)
    head = make_head(kind, target.model, DRAFT_IDS)
    batch = teacher_batch(target.model, head, random_sequences(4, 24))
    before, accept_before = float(head.loss(batch)[0].detach()), head.evaluate(batch)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(60):
        loss, metrics = head.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = head.evaluate(batch)
    assert float(head.loss(batch)[0].detach()) < 0.8 * before
    assert after["accept@1"] > accept_before["accept@1"]
    assert 1.0 <= after["mean_accept_len"] <= 1.0 + sum(1 for k in after if k.startswith("accept@"))
    assert all(not p.requires_grad or p.grad is not None for p in head.parameters())


def test_eagle_drafts_with_the_computation_it_was_trained_on(tmp_path):
    """A chain drafted by the eagle drafter (cache, catch-up, self-fed pairs) gives the layer output
    of training-time test's step j at the same pair: what was trained is what drafts."""
    target = tiny_target()
    path, head = saved_head(tmp_path, "eagle", target, train_steps=5)
    tokens = random_sequences(1, 20, seed=3)[0]
    drafter = make_drafter("eagle", target, head=str(path))
    outputs = drafter.head._unroll(teacher_batch(target.model, head, [tokens]))[0]  # the weights as saved
    start = 12  # the drafter has the target's states of positions < start and tokens up to start
    _, states = target.model.forward(torch.tensor(tokens[:start]), torch.arange(start), target.model.new_cache(start),
                                     capture=head.layers)
    drafter.begin(tokens[:start])
    drafter.prefilled(0, states)
    drafter._catch_up(tokens[: start + 1])  # pairs 0 .. start - 1
    torch.testing.assert_close(drafter._root_output(), outputs[0][0][0, start - 1], rtol=1e-4, atol=1e-4)
    # Now draft along the true tokens: depth d reads the head's own output of depth d - 1.
    feature, committed = drafter._root_output(), drafter.cache.length
    for j in range(1, head.cfg["ttt_steps"]):
        pair = start - 1 + j
        allowed = torch.ones(1, committed + j, dtype=torch.bool)
        g = drafter._layer(feature[None], torch.tensor([tokens[pair + 1]]), torch.tensor([pair]), committed + j - 1, allowed)
        torch.testing.assert_close(g[0], outputs[j][0][0, pair], rtol=1e-4, atol=1e-4)
        feature = g[0]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_drafter_proposes_within_budget_with_scores_and_exact_q(tmp_path, kind, temperature):
    target = tiny_target()
    path, _ = saved_head(tmp_path, kind, target)
    drafter = make_drafter(kind, target, head=str(path), depth=3, beam=2, top_k=3)
    prompt = random_sequences(1, 10, seed=1)[0]
    n = len(prompt)
    _, states = target.model.forward(torch.tensor(prompt), torch.arange(n), target.model.new_cache(n), capture=drafter.hidden_layers)
    drafter.begin(prompt)
    drafter.prefilled(0, states)
    params = SamplingParams(temperature=temperature, seed=5)
    tree = drafter.propose(DecodeState(prompt + [7], n, params), budget=6)
    assert 0 < len(tree) <= 6 and all(t in DRAFT_IDS for t in tree.tokens)
    for i, p in enumerate(tree.parents):  # scores never rise along a path
        assert 0 < tree.scores[i] <= (1.0 if p < 0 else tree.scores[p])
    if temperature:
        # each node's q holds its token, and siblings drawn later exclude the earlier ones
        assert all(tree.draft_probs[i, t] > 0 for i, t in enumerate(tree.tokens))
        for parent in set(tree.parents):
            kids = tree.children(parent)
            for a, b in zip(kids, kids[1:]):
                assert tree.draft_probs[b, tree.tokens[a]] == 0
    else:
        assert tree.draft_probs is None


def test_head_files_are_checked(tmp_path):
    target = tiny_target()
    path, _ = saved_head(tmp_path, "eagle", target)
    head, card = load_head(path, target.model)
    assert card["config"]["kind"] == "eagle" and head.draft_ids.tolist() == DRAFT_IDS
    wider = TINY.__class__(**{**TINY.to_dict(), "vocab_size": 120})
    with pytest.raises(FastDecodeError, match="trained for tiny.*vocabulary 97"):
        load_head(path, LlamaModel(wider, tiny_weights(wider), torch.float32))
    broken = tmp_path / "broken"
    (broken.with_suffix(".json")).write_text(json.dumps(card))
    broken.with_suffix(".safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FastDecodeError, match="not a readable eagle head"):
        load_head(broken, target.model)
    with pytest.raises(FastDecodeError, match="does not exist"):
        load_head(tmp_path / "nowhere", target.model)
    for suffix in (".safetensors", ".json"):  # a name with dots of its own
        (tmp_path / f"eagle.v2{suffix}").write_bytes(Path(path).with_suffix(suffix).read_bytes())
    assert load_head(tmp_path / "eagle.v2.safetensors", target.model)[1] == card
    (tmp_path / "notes.md").write_text("not a head")
    with pytest.raises(FastDecodeError, match="notes.md is not a head: pass its .safetensors file"):
        load_head(tmp_path / "notes.md", target.model)
    with pytest.raises(FastDecodeError, match="holds a eagle head, not a medusa head"):
        make_drafter("medusa", target, head=str(path))


def test_no_head_says_how_to_train_one():
    with pytest.raises(FastDecodeError, match="no eagle head ships for model 'tiny'; train one with `fastdecode train"):
        make_drafter("eagle", tiny_target())


@pytest.mark.parametrize("kind", HEAD_KINDS + ("auto",))
def test_any_head_is_lossless_on_the_tiny_model(tmp_path, kind):
    """Greedy output with a (barely trained) head equals plain decoding, token for token, through
    the real decode loop: the prefill hands over the prompt's states, each step its committed rows'."""
    from fastdecode.engine import Engine
    from fastdecode.runtime.cost_curve import CostCurve

    target = tiny_target()
    head_kind = "eagle" if kind == "auto" else kind
    path, _ = saved_head(tmp_path, head_kind, target, train_steps=5)
    engine = Engine(target.model, byte_tokenizer(tmp_path, TINY.vocab_size, eos_id=96), "tiny")
    engine.cost_curve = CostCurve([1, 8, 64], [0.01, 0.011, 0.03])  # cheap rows: verify what is proposed
    options = {"head": str(path)} if kind != "auto" else {"members": "eagle,ngram", "head": str(path)}
    drafter = make_drafter(kind, Target(target.model, engine.tokenizer, "tiny"), **options)
    for seed in range(3):
        prompt = random_sequences(1, 14, seed=10 + seed)[0]
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        plain = engine.generate(prompt, params, make_drafter("ar"))
        drafted = engine.generate(prompt, params, drafter)
        assert drafted.token_ids == plain.token_ids
        assert drafted.stats.draft_tokens > 0


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_a_head_packed_for_drafting_computes_what_it_trained(kind):
    """Packing (merged products such as eagle's q, k and v; native norms; the engine's GEMM) changes
    how the head computes, not what: in float32 its outputs are the unpacked head's."""
    import copy

    from fastdecode.heads.blocks import pack_for_drafting

    target = tiny_target()
    torch.manual_seed(0)
    head = make_head(kind, target.model, DRAFT_IDS)
    with torch.no_grad():  # no zero-initialised projection may hide a wrong split
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    packed = pack_for_drafting(copy.deepcopy(head), torch.float32)
    assert packed.merged or not head.MERGED
    H = TINY.hidden_size
    with torch.no_grad():
        if kind == "eagle":
            batch = teacher_batch(target.model, head, random_sequences(2, 16))
            for (g, _), (g_packed, _) in zip(head._unroll(batch)[0], packed._unroll(batch)[0]):
                torch.testing.assert_close(g_packed, g, rtol=1e-4, atol=1e-4)
        else:
            states, path = torch.randn(3, 1, H), torch.randn(3, len(head.blocks) + 1, H)
            hidden = head.base(states)
            torch.testing.assert_close(packed.base(states), hidden, rtol=1e-4, atol=1e-4)
            for k in range(len(head.blocks)):
                torch.testing.assert_close(packed.ahead(k, hidden, path[:, : k + 1]), head.ahead(k, hidden, path[:, : k + 1]),
                                           rtol=1e-4, atol=1e-4)


def test_rotary_from_its_table_is_the_formula_bit_for_bit():
    from fastdecode.heads.blocks import rotary

    x = torch.randn(3, 700, 2, 16)
    positions = torch.arange(700).expand(3, 700) + torch.tensor([[0], [100], [900]])  # tables of several sizes
    inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    angles = positions.float()[..., None] * inv
    cos = torch.cat([angles.cos(), angles.cos()], -1).unsqueeze(-2)
    sin = torch.cat([angles.sin(), angles.sin()], -1).unsqueeze(-2)
    expected = x * cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * sin
    assert torch.equal(rotary(x, positions, 10000.0), expected)


@pytest.mark.parametrize("row_cost, grows", [(0.0, True), (1.0, False)])
def test_the_tree_grows_only_where_its_rows_can_pay(tmp_path, row_cost, grows):
    """A node is expanded only when a child could beat the cost of its verify row: with free rows
    (a GPU) the tree grows as deep as allowed; when a row costs a whole step no child can pay, so
    only the root's children (which cost no expansion) are drafted, except on the exploring steps
    that keep the child rates measured."""
    from fastdecode.drafters.trained import EXPLORE_EVERY
    from fastdecode.runtime.cost_curve import CostCurve

    target = tiny_target()
    target.cost_curve = CostCurve([1, 2, 64], [1.0, 1.0 + row_cost, 64.0])  # slow steps: expanding is cheap beside them
    path, _ = saved_head(tmp_path, "medusa", target, train_steps=5)
    drafter = make_drafter("medusa", target, head=str(path), depth=3, beam=2, top_k=2, min_score=0.0)
    prompt = random_sequences(1, 10, seed=1)[0]
    _, states = target.model.forward(torch.tensor(prompt), torch.arange(10), target.model.new_cache(10),
                                     capture=drafter.hidden_layers)
    drafter.prefilled(0, states)
    depths = []
    for _ in range(EXPLORE_EVERY):
        tree = drafter.propose(DecodeState(prompt + [7], 10, SamplingParams()), budget=32)
        depths.append(max(tree.depths()))
    assert depths[:-1] == [3 if grows else 1] * (EXPLORE_EVERY - 1)
    assert depths[-1] == 3  # the exploring proposal


@pytest.mark.parametrize("pays, rest", [(False, True), (True, True), (False, False)])
def test_a_head_rests_while_its_drafts_do_not_pay(tmp_path, pays, rest):
    """A drafted step saves a step per accepted node and costs its verify rows and its drafting
    time. When nothing it drafts is accepted, drafting only loses: after the warm-up the head
    proposes nothing, except on one step in PROBE_EVERY. When its node is accepted (a token saved
    for half a step's row), or with rest=False, it drafts on every step."""
    from fastdecode.drafters.trained import PROBE_EVERY, WARMUP
    from fastdecode.runtime.cost_curve import CostCurve

    target = tiny_target()
    target.cost_curve = CostCurve([1, 2, 64], [1.0, 1.5, 64.0])  # slow steps: drafting takes little beside them
    path, _ = saved_head(tmp_path, "medusa", target, train_steps=5)
    drafter = make_drafter("medusa", target, head=str(path), depth=2, min_score=0.0, rest=rest)
    prompt = random_sequences(1, 10, seed=1)[0]
    _, states = target.model.forward(torch.tensor(prompt), torch.arange(10), target.model.new_cache(10),
                                     capture=drafter.hidden_layers)
    drafter.prefilled(0, states)
    drafted = []
    for _ in range(WARMUP + 3 * PROBE_EVERY):
        tree = drafter.propose(DecodeState(prompt + [7], 10, SamplingParams()), budget=1)
        drafted.append(len(tree) > 0)
        accepted = [0] if pays and len(tree) else []
        hidden = states[-1:].expand(len(accepted) + 1, -1, -1)  # the committed rows' states (any will do)
        drafter.observe(StepResult.whole(tree, accepted, [7], torch.zeros(len(tree) + 1, 97), hidden))
    assert all(drafted[:WARMUP])
    if pays or not rest:
        assert all(drafted)
    else:
        later = range(WARMUP, len(drafted))
        assert [step for step in later if drafted[step]] == [step for step in later if (step + 1) % PROBE_EVERY == 0]


def test_eagle_after_resting_feeds_the_waiting_pairs_and_stays_lossless(tmp_path):
    """While eagle rests, the target's states of the committed rows wait; the next drafted step
    feeds them all into the head's cache at once. Through the real decode loop, with rows that
    cost a whole step (so the head rests after its warm-up), greedy output still equals plain
    decoding's, and the probing steps draft from a cache that holds every pair."""
    from fastdecode.drafters.trained import WARMUP
    from fastdecode.engine import Engine
    from fastdecode.runtime.cost_curve import CostCurve

    target = tiny_target()
    path, _ = saved_head(tmp_path, "eagle", target, train_steps=5)
    engine = Engine(target.model, byte_tokenizer(tmp_path, TINY.vocab_size, eos_id=96), "tiny")
    engine.cost_curve = CostCurve([1, 2, 64], [0.01, 0.011, 0.03])  # the engine verifies what is proposed
    drafting = Target(target.model, engine.tokenizer, "tiny")
    drafting.cost_curve = CostCurve([1, 2, 64], [0.01, 0.02, 0.64])  # the head judges its rows dear
    drafter = make_drafter("eagle", drafting, head=str(path), min_score=0.0)
    sizes, fed, propose = [], [], drafter.propose

    def counted(state, budget):
        tree = propose(state, budget)
        sizes.append(len(tree))
        if tree:  # pairs fed into the head's cache, against pairs whose next token exists
            fed.append((drafter.cache.length, len(state.tokens) - 1))
        return tree

    drafter.propose = counted
    prompt = random_sequences(1, 14, seed=21)[0]
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    drafted = engine.generate(prompt, params, drafter)
    assert drafted.token_ids == engine.generate(prompt, params, make_drafter("ar")).token_ids
    assert all(sizes[:WARMUP]) and 0 < sum(map(bool, sizes[WARMUP:])) < len(sizes) - WARMUP
    assert all(length == pairs for length, pairs in fed)
