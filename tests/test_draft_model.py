"""The `draft` drafter (classic speculative decoding with a separate draft model): its cache sync,
scores and draft probabilities, the checks that refuse a draft with another tokenizer, the layer
truncation helper, and greedy exactness against `ar` on the real model."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdecode import SamplingParams
from fastdecode.drafters import make_drafter
from fastdecode.drafters.base import DecodeState, StepResult
from fastdecode.drafters.acceptance import Calibration
from fastdecode.drafters.draft_model import common_prefix
from fastdecode.errors import FastDecodeError
from fastdecode.models.loader import load
from fastdecode.models.truncate import make_truncated_checkpoint

MODEL = "smollm2-135m-instruct"
PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and it barked loudly at the "
    "fox, which ran away into the forest where it met an owl sitting on a branch."
)
REPEAT = f"Repeat the following paragraph exactly: {PARAGRAPH}"
QUESTION = "What is the capital of France? Explain its history briefly."


@pytest.fixture(scope="module")
def draft4(llm, tmp_path_factory):
    """The default model cut to its first 4 of 30 layers (a poor but fast same-tokenizer draft)."""
    return make_truncated_checkpoint(MODEL, 4, tmp_path_factory.mktemp("draft4") / "model")


def _variant(folder, tmp_path, edit):
    """A copy of a checkpoint folder (weights linked, not copied) with one file edited."""
    out = tmp_path / "variant"
    out.mkdir()
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, out / f.name)
        else:
            shutil.copy(f, out / f.name)
    edit(out)
    return out


def _state(tokens, params=None):
    return DecodeState(list(tokens), len(tokens), params or SamplingParams())


@pytest.fixture
def drafter(llm, draft4):
    return make_drafter("draft", llm.target, draft_model=str(draft4), max_depth=5, min_confidence=0.0)


# --- pure helpers -------------------------------------------------------------------------------


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([5, 2], [1, 2]) == 0
    assert common_prefix([], [1]) == 0
    long = list(range(1000))
    assert common_prefix(long, long[:700] + [-1] + long[701:]) == 700


def test_calibration_learns_the_draft_bias():
    cal = Calibration()
    assert cal.rate(True, 0.55) == pytest.approx(0.55)  # no evidence yet: the draft's own probability
    for _ in range(200):  # the draft says 0.55 but the target agrees only a tenth of the time
        cal.record(True, 0.55, False)
    for _ in range(22):
        cal.record(True, 0.55, True)
    assert cal.rate(True, 0.55) == pytest.approx(0.1, abs=0.02)
    assert cal.rate(True, 0.95) == pytest.approx(0.95)  # other bins and modes are untouched
    assert cal.rate(False, 0.55) == pytest.approx(0.55)


# --- the truncation helper ----------------------------------------------------------------------


def test_truncated_checkpoint_loads(llm, draft4):
    loaded = load(draft4, "float32")  # the dtype of the `llm` fixture
    assert loaded.model.config.num_layers == 4
    assert loaded.model.config.vocab_size == llm.engine.model.config.vocab_size
    assert loaded.tokenizer.eos_ids == llm.tokenizer.eos_ids
    # Layer 0 of the copy is layer 0 of the source; the embeddings are the source's.
    assert torch.equal(loaded.model.embed, llm.engine.model.embed)
    assert torch.equal(loaded.model.layers[0].attn_norm, llm.engine.model.layers[0].attn_norm)


def test_truncate_rejects_bad_layers(tmp_path):
    with pytest.raises(FastDecodeError, match="layers"):
        make_truncated_checkpoint(MODEL, 31, tmp_path / "x")
    with pytest.raises(FastDecodeError, match="layers"):
        make_truncated_checkpoint(MODEL, [0, 0], tmp_path / "x")


# --- option and compatibility errors ------------------------------------------------------------


def test_missing_draft_model_is_a_clear_error(llm):
    with pytest.raises(FastDecodeError, match="draft_model"):
        llm.generate("Hi", SamplingParams(max_new_tokens=4), method="draft")


@pytest.mark.parametrize("options, message", [
    ({"max_depth": 0}, "max_depth"), ({"max_depth": 2.5}, "max_depth"),
    ({"min_confidence": 1.0}, "min_confidence"), ({"min_confidence": -0.1}, "min_confidence"),
])
def test_invalid_options(llm, draft4, options, message):
    with pytest.raises(FastDecodeError, match=message):
        make_drafter("draft", llm.target, draft_model=str(draft4), **options)


def test_unknown_draft_model(llm, tmp_path):
    with pytest.raises(FastDecodeError, match="unknown model"):
        make_drafter("draft", llm.target, draft_model=str(tmp_path / "nowhere"))


def test_other_vocabulary_is_refused(llm, draft4, tmp_path):
    def swap_two_tokens(folder):
        tok = json.loads((folder / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
        (folder / "tokenizer.json").write_text(json.dumps(tok))

    other = _variant(draft4, tmp_path, swap_two_tokens)
    with pytest.raises(FastDecodeError) as error:
        make_drafter("draft", llm.target, draft_model=str(other))
    message = str(error.value)
    assert "tokenizer" in message and MODEL in message and str(other) in message
    assert "'hello'" in message and "2 tokens differ" in message


def test_other_eos_is_refused(llm, draft4, tmp_path):
    def add_eos(folder):
        info = json.loads((folder / "tokenizer_info.json").read_text())
        info["eos_ids"] = sorted(set(info["eos_ids"]) | {0, 1})
        (folder / "tokenizer_info.json").write_text(json.dumps(info))

    other = _variant(draft4, tmp_path, add_eos)
    with pytest.raises(FastDecodeError, match="end-of-sequence ids differ"):
        make_drafter("draft", llm.target, draft_model=str(other))


def test_other_logits_width_is_refused(llm, draft4, tmp_path):
    def pad_vocabulary(folder):
        (folder / "model.safetensors").unlink()  # a link to the shared weights: write a new file
        weights = load_file(str(draft4 / "model.safetensors"))
        embed = weights["model.embed_tokens.weight"]
        weights["model.embed_tokens.weight"] = torch.cat([embed, torch.zeros(64, embed.shape[1])])
        save_file(weights, str(folder / "model.safetensors"))

    other = _variant(draft4, tmp_path, pad_vocabulary)
    with pytest.raises(FastDecodeError, match="49216 token ids.*49152"):
        make_drafter("draft", llm.target, draft_model=str(other))


# --- proposals ----------------------------------------------------------------------------------


def test_greedy_chain_and_scores(llm, drafter):
    tokens = llm.prompt_ids(QUESTION)
    drafter.begin(tokens)
    tree = drafter.propose(_state(tokens), budget=5)
    assert len(tree) == 5 and tree.parents == [-1, 0, 1, 2, 3]
    assert tree.draft_probs is None  # greedy: point masses
    # The draft's own argmax chain, scored by the cumulative product of its probabilities.
    model, cache, score = drafter.model, drafter.model.new_cache(len(tokens) + 8), 1.0
    logits = model.forward(torch.tensor(tokens), torch.arange(len(tokens)), cache)[-1]
    cache.commit(len(tokens))
    for i, token in enumerate(tree.tokens):
        assert token == int(logits.argmax())
        score *= float(torch.softmax(logits, -1)[token])
        assert tree.scores[i] == pytest.approx(score, rel=1e-4)
        logits = model.forward(torch.tensor([token]), torch.tensor([cache.length]), cache)[0]
        cache.commit(1)
    assert drafter.propose(_state(tokens), budget=0).tokens == []


def test_budget_and_min_confidence_limit_the_chain(llm, draft4):
    tokens = llm.prompt_ids(QUESTION)
    eager = make_drafter("draft", llm.target, draft_model=str(draft4), max_depth=8, min_confidence=0.0)
    assert len(eager.propose(_state(tokens), budget=3)) == 3
    assert len(eager.propose(_state(tokens), budget=20)) == 8
    cautious = make_drafter("draft", llm.target, draft_model=str(draft4), max_depth=8, min_confidence=0.99)
    tree = cautious.propose(_state(tokens), budget=8)
    # It stops at the first node whose cumulative score falls below min_confidence.
    assert all(s >= 0.99 for s in tree.scores[:-1])
    assert len(tree) == 8 or tree.scores[-1] < 0.99


def test_cache_follows_the_context(llm, drafter, monkeypatch):
    tokens = llm.prompt_ids(QUESTION)
    drafter.begin(tokens)
    first = drafter.propose(_state(tokens), budget=5)
    # The cache holds the context and the chain but its last token (never fed).
    assert drafter.cached == tokens + first.tokens[:-1]
    assert drafter.cache.length == len(drafter.cached)

    fed = []
    forward = drafter.model.forward
    monkeypatch.setattr(drafter.model, "forward", lambda t, *a, **k: fed.append(t.tolist()) or forward(t, *a, **k))
    # Two draft tokens accepted, then a different bonus token: only the bonus is fed to catch up.
    bonus = (first.tokens[2] + 1) % 49152
    drafter.observe(StepResult.whole(first, [0, 1], first.tokens[:2] + [bonus], torch.zeros(6, 49152)))
    context = tokens + first.tokens[:2] + [bonus]
    second = drafter.propose(_state(context), budget=5)
    assert fed[0] == [bonus]
    assert drafter.cached == context + second.tokens[:-1]

    # A context that diverges inside the prompt (a new request) rolls back to the shared prefix.
    fed.clear()
    other = tokens[:10] + [7, 8, 9]
    drafter.begin(other)
    drafter.propose(_state(other), budget=2)
    assert fed[0] == [7, 8, 9]
    assert drafter.cached[: len(other)] == other


def test_cache_grows(llm, drafter):
    from fastdecode.runtime.kv_cache import BLOCK_ROWS

    tokens = llm.prompt_ids(PARAGRAPH * 12)  # longer than the first allocation
    first = drafter.cache.pool.num_blocks * BLOCK_ROWS
    assert len(tokens) > first
    tree = drafter.propose(_state(tokens[:20]), budget=2)
    tree = drafter.propose(_state(tokens), budget=4)
    assert drafter.cache.pool.num_blocks * BLOCK_ROWS >= len(tokens) + 4 > first
    assert drafter.cached == tokens + tree.tokens[:-1]


def test_sampled_chain_carries_its_distributions(llm, drafter):
    tokens = llm.prompt_ids(QUESTION)
    params = SamplingParams(temperature=0.8, top_k=50, seed=123)
    runs = []
    for _ in range(2):
        drafter.begin(tokens)
        runs.append(drafter.propose(_state(tokens, params), budget=5))
    tree = runs[0]
    assert runs[1].tokens == tree.tokens  # a seeded request drafts reproducibly
    assert tree.draft_probs.shape == (len(tree), 49152) and tree.draft_probs.dtype == torch.float32
    assert torch.allclose(tree.draft_probs.sum(-1), torch.ones(len(tree)))
    assert ((tree.draft_probs > 0).sum(-1) <= 50).all()  # top-k applied, as for the target
    q = tree.draft_probs[torch.arange(len(tree)), tree.tokens]
    assert (q > 0).all()
    assert tree.scores == pytest.approx(torch.cumprod(q, 0).tolist(), rel=1e-5)


# --- end to end on the real model ---------------------------------------------------------------


@pytest.mark.parametrize("prompt", [REPEAT, QUESTION])
def test_greedy_output_equals_ar(llm, draft4, prompt):
    params = SamplingParams(max_new_tokens=48)
    ar = llm.generate(prompt, params, method="ar")
    result = llm.generate(prompt, params, method="draft", draft_model=str(draft4), min_confidence=0.0)
    assert result.token_ids == ar.token_ids
    assert result.text == ar.text
    assert result.stats.drafts > 0 and result.stats.forward_passes <= ar.stats.forward_passes


def test_a_perfect_draft_is_always_accepted(llm):
    """The target as its own draft: every drafted token must pass, so the draft cache, the chain and
    the positions are right (bitwise batch-invariant forwards make the argmaxes identical)."""
    params = SamplingParams(max_new_tokens=48)
    ar = llm.generate(REPEAT, params, method="ar")
    result = llm.generate(REPEAT, params, method="draft", draft_model=MODEL)
    assert result.token_ids == ar.token_ids
    assert result.stats.drafts > 0
    assert result.stats.accepted_tokens == result.stats.draft_tokens
    assert result.stats.mean_acceptance_length > 3
    assert result.stats.forward_passes < ar.stats.forward_passes / 2
