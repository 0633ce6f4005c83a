"""Lexical Unit Decoding: placeholder rows in the verify forward, their training, and their files.

The real default model's exactness (greedy token for token, sampling by chi-square) is in
test_methods.py with the shipped file; here everything runs on tiny random-weight models."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastdecode.api import LLM
from fastdecode.cli import main
from fastdecode.errors import FastDecodeError
from fastdecode.heads import load_head, make_head, save_head
from fastdecode.models.config import ModelConfig
from fastdecode.models.segment import Segment
from fastdecode.runtime.sampling import SamplingParams
from fastdecode.runtime.tree import DraftTree
from fastdecode.runtime.verify import verify_greedy
from fastdecode.sequence import _verify_layout
from fastdecode.train.lud_data import LudData

from conftest import TEST_COST_CURVE, tiny_weights
from test_train_pipeline import prompts_file, tiny_model_folder


def _verify_forward(model, context: list[int], draft: list[int], placeholders: torch.Tensor | None,
                    hangs: tuple[int, ...] = (-1,)):
    """The logits of one verify forward (root = context[-1], a draft chain, a chain of placeholder
    rows after each hang node) after the rest of the context went through the cache."""
    cache = model.new_cache(64)
    n = len(context) - 1
    model.forward(torch.tensor(context[:-1]), torch.arange(n), cache)
    cache.commit(n)
    tree = DraftTree.chain(draft)
    m = 0 if placeholders is None else len(placeholders)
    offsets, mask = _verify_layout(tree, list(hangs) if m else [], m)
    segment = Segment(torch.tensor([context[-1]] + draft + [0] * (m * len(hangs))), n + offsets, cache, mask,
                      placeholders=None if placeholders is None else placeholders.repeat(len(hangs), 1, 1))
    return model.forward_batch([segment]), cache


def test_placeholder_rows_leave_the_verify_rows_bitwise_unchanged(tiny_model):
    """The root's and the draft's logits are bitwise those of a forward without placeholders, and
    the placeholders' own logits are what training computes for them (the PyTorch replica)."""
    head = make_head("lud", tiny_model, None, placeholders=3)
    with torch.no_grad():
        head.shifts.add_(torch.randn(head.shifts.shape, generator=torch.Generator().manual_seed(0)))
    context, draft = [5, 17, 42, 8, 91, 3, 60], [11, 12]
    plain, _ = _verify_forward(tiny_model, context, draft, None)
    shifts = head.shifts.detach().float()
    mixed, cache = _verify_forward(tiny_model, context, draft, shifts)
    assert torch.equal(mixed[: len(draft) + 1], plain)
    other, _ = _verify_forward(tiny_model, context, draft, shifts.flip(0))
    assert not torch.allclose(other[len(draft) + 1 :], mixed[len(draft) + 1 :])  # the shifts are read

    T = len(context)  # training's view: the whole context in the cache, the root its last row
    full = tiny_model.new_cache(64)
    tiny_model.forward(torch.tensor(context), torch.arange(T), full)
    layers = range(tiny_model.config.num_layers)
    keys = torch.stack([full.keys(i, T).permute(2, 0, 1) for i in layers])
    values = torch.stack([full.values(i, T).permute(1, 0, 2) for i in layers])
    k = len(shifts)
    sees = torch.cat([torch.ones(k, T, dtype=torch.bool), torch.ones(k, k, dtype=torch.bool).tril()], 1)
    replica = head.target.logits(shifts, T - 1 + torch.arange(1, k + 1), keys, values, torch.arange(T), sees,
                                 torch.tensor([[0, k, 0, T]]))
    assert torch.allclose(replica, mixed[len(draft) + 1 :], atol=0.05, rtol=0.05)  # bfloat16 weights in the replica


def test_a_chain_hung_after_a_draft_node_guesses_as_if_that_node_were_the_root(tiny_model):
    """Placeholders hung after draft node 0 see the context, the root and that node: their logits
    are bitwise those of the root's chain one token later, and the tree's rows stay unchanged."""
    head = make_head("lud", tiny_model, None, placeholders=2)
    with torch.no_grad():
        head.shifts.add_(torch.randn(head.shifts.shape, generator=torch.Generator().manual_seed(1)))
    shifts = head.shifts.detach().float()
    context, draft = [5, 17, 42, 8, 91, 3, 60], [11, 12, 13]
    both, _ = _verify_forward(tiny_model, context, draft, shifts, hangs=(-1, 0))
    root_only, _ = _verify_forward(tiny_model, context, draft, shifts)
    later, _ = _verify_forward(tiny_model, context + draft[:1], draft[1:], shifts)
    rows = len(draft) + 1
    assert torch.equal(both[: rows + 2], root_only)
    assert torch.equal(both[rows + 2 :], later[rows - 1 :])


def test_trusted_nodes_are_accepted_without_verification():
    logits = torch.zeros(4, 10)
    logits[:, 7] = 1.0  # the target wants 7 everywhere
    tree = DraftTree.chain([1, 2, 7])
    assert verify_greedy(tree, logits) == ([], 7)
    tree.trusted = 2
    assert verify_greedy(tree, logits) == ([0, 1, 2], 7)  # two taken as they are, the third verified
    assert tree.subtree([0, 1]).trusted == 2 and tree.subtree([0]).trusted == 1


def test_units_follow_the_targets_confidence(tiny_model):
    """Training anchors: placeholder 1 counts only where the token it guesses was predicted at least
    `threshold` likely, and placeholder j only while every token up to its own was; held-out anchors
    count every guess."""
    seq = [int(t) for t in torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(3))]
    cache = tiny_model.new_cache(40)
    probs = torch.softmax(tiny_model.forward(torch.tensor(seq), torch.arange(40), cache), -1)
    p = [0.0] + [float(probs[t - 1, seq[t]]) for t in range(1, 40)]
    threshold = sorted(p[10:])[len(p[10:]) // 2]  # half the tokens confident
    data = LudData(tiny_model, [(seq, 10)], k=3, threshold=threshold, seed=0, units_only=True, anchors=100)
    batch = data.batch([0])
    assert len(batch["anchors"]) > 0 and batch["mask"][:, 0].all()
    for n, row in zip(batch["anchors"].tolist(), batch["mask"].tolist()):
        expect = [all(p[n + 2 + i] >= threshold for i in range(j + 1)) and n + j + 2 < 40 for j in range(3)]
        assert row == expect, n
    held = LudData(tiny_model, [(seq, 10)], k=3, threshold=threshold, seed=0, units_only=False, anchors=100).batch([0])
    assert held["anchors"].tolist() == list(range(9, 38)) and torch.equal(held["mask"], held["valid"])


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """`fastdecode train --heads lud` on a tiny model: its folder, the run folder and the card."""
    monkeypatch.setenv("FASTDECODE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTDECODE_SPEC_BENCH", str(tmp_path / "none.jsonl"))
    (tmp_path / "none.jsonl").write_text("")
    model, out = tiny_model_folder(tmp_path / "tiny"), tmp_path / "run"
    assert main(["train", "--model", str(model), "--dtype", "float32", "--heads", "lud",
                 "--prompts-file", str(prompts_file(tmp_path / "p.jsonl")), "--prompts", "8", "--max-new-tokens", "24",
                 "--epochs", "3", "--batch-tokens", "512", "--lr", "3e-2", "--unit-threshold", "0.02", "--out", str(out)]) == 0
    return model, out, json.loads((out / "lud.json").read_text())


def test_training_lowers_the_loss_and_the_file_drafts_losslessly(trained):
    model, out, card = trained
    losses = [h["train_loss"] for h in card["acceptance"]]
    assert losses[-1] < losses[0], losses
    assert card["config"]["kind"] == "lud" and card["config"]["placeholders"] == 3
    assert card["config"]["threshold"] == 0.02 and card["target"]["sha256"]
    assert "mean_accept_len" in card["acceptance"][-1]

    llm = LLM(str(model), "float32")
    llm.engine.cost_curve = TEST_COST_CURVE
    prompt = llm.prompt_ids([{"role": "user", "content": "Tell me about foxes."}])
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = llm.engine.generate(prompt, params, llm.drafter("ar"))
    for placeholders, hang_above in ((1, 1.0), (3, 1.0), (1, 0.0), (2, 0.0)):
        drafter = llm.drafter("lud", head=str(out / "lud.safetensors"), placeholders=placeholders, hang_above=hang_above)
        chains = []  # the nodes each step's placeholder chains hung after
        observe = drafter.observe
        drafter.observe = lambda result: (chains.append(sorted(result.placeholder_logits or ())), observe(result))
        result = llm.engine.generate(prompt, params, drafter)
        assert result.token_ids == plain.token_ids, placeholders
        assert result.stats.draft_tokens > 0
        assert any(hung == [-1, 0] for hung in chains) == (hang_above == 0.0)  # a second chain after node 0
    merged = llm.engine.generate(prompt, params, llm.drafter("auto", members="lud,ngram", lud_head=str(out / "lud.safetensors")))
    assert merged.token_ids == plain.token_ids and any(t.source.startswith("lud") for t in merged.tokens)
    with pytest.raises(FastDecodeError, match="auto: members must be lossless, and lud-confidence is not"):
        llm.drafter("auto", members="lud-confidence,ngram")
    # LUD's own rule takes confident guesses unverified; with threshold 0 it takes every guess
    lossy = llm.engine.generate(prompt, params, llm.drafter("lud-confidence", head=str(out / "lud.safetensors"), threshold=1e-9, top_k=1))
    assert lossy.token_ids != plain.token_ids and lossy.stats.accepted_tokens == lossy.stats.draft_tokens


def _generate(model, *options) -> list[str]:
    argv = ["generate", "hello", "--model", str(model), "--dtype", "float32", "--max-new-tokens", "4", "--method", "lud"]
    for option in options:
        argv += ["--option", option]
    return argv


def test_bad_files_and_counts_are_refused_with_exit_2(trained, tmp_path, capsys):
    model, out, _ = trained
    capsys.readouterr()

    def fails(argv, message):
        assert main(argv) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # after the model's loading line
        assert last.startswith("error: ") and message in last, last

    fails(_generate(model, f"head={out / 'lud.safetensors'}", "placeholders=4"),
          "placeholders must be an integer from 1 to 3")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(out / "lud.json", corrupt / "lud.json")
    (corrupt / "lud.safetensors").write_bytes(b"not a safetensors file")
    fails(_generate(model, f"head={corrupt / 'lud.safetensors'}"), "is not a readable lud head")
    other = ModelConfig(vocab_size=258, hidden_size=48, intermediate_size=48, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=12, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)
    from fastdecode.models.llama import LlamaModel

    foreign = make_head("lud", LlamaModel(other, tiny_weights(other), torch.float32), None)
    path = save_head(foreign, tmp_path / "foreign" / "lud", {"target": {"model": "another-model"}})
    fails(_generate(model, f"head={path}"), "was trained for another-model")
    fails(_generate(model), "no lud file ships for model")
    head, _ = load_head(out / "lud.safetensors")
    assert head.count == 3
