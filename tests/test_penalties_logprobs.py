"""Penalties, logit bias, log-probabilities and token provenance: exact under every method.

Penalties adjust each verify row by that row's own context (the committed tokens and the drafted
path to it), so speculation must give plain decoding's tokens with the same penalties. The forward
is batch-invariant, so each token's log-probability must be bitwise the one plain decoding reports.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.errors import FastDecodeError
from fastdecode.runtime.penalties import Penalties
from fastdecode.runtime.tree import DraftTree
from fastdecode.runtime.verify import verify_greedy, verify_sampling

from stats import chi_square_p_value

REPEATING = "Rewrite this sentence three times: The quick brown fox jumps over the lazy dog."
PROMPTS = [REPEATING, "List the days of the week, one per line."]
METHODS = ["ngram", "suffix", "recycling", "lookahead", "auto"]


def test_penalties_follow_the_openai_and_vllm_definitions():
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, logit_bias={4: -1.0})
    penalties = Penalties(params, prompt=[0], vocab_size=5)
    penalties.commit([1, 1])
    row = torch.tensor([2.0, 2.0, -2.0, 3.0, 1.0])
    # token 0: in the prompt only (repetition); 1: generated twice; 2: drafted once on the path;
    # 3: untouched; 4: biased by -1.
    adjusted = penalties.apply(row, path=[2])
    expected = torch.tensor([1.0, 1.0 - 0.5 - 0.5, -4.0 - 0.25 - 0.5, 3.0, 0.0])
    assert torch.equal(adjusted, expected)
    assert torch.equal(row, torch.tensor([2.0, 2.0, -2.0, 3.0, 1.0])), "the logits given are not changed"
    with pytest.raises(FastDecodeError, match="logit_bias"):
        Penalties(SamplingParams(logit_bias={9: 1.0}), [0], vocab_size=5)
    for bad in ({"presence_penalty": 3.0}, {"frequency_penalty": float("nan")}, {"repetition_penalty": 0.0},
                {"logit_bias": {1: 101.0}}, {"logprobs": 21}, {"logprobs": -1}):
        with pytest.raises(FastDecodeError):
            SamplingParams(**bad)


def test_greedy_verification_adjusts_each_row_by_its_own_path():
    tree = DraftTree.chain([1, 1])  # drafts token 1 twice
    logits = torch.zeros(3, 4)
    logits[:, 1] = 1.0  # the raw argmax is 1 everywhere
    logits[:, 2] = 0.6
    assert verify_greedy(tree, logits) == ([0, 1], 1)
    # A presence penalty of 0.5 makes token 1 lose once it is on the path: the first draft is
    # accepted (row 0 has seen nothing), the second rejected, and the bonus is token 2.
    penalties = Penalties(SamplingParams(presence_penalty=0.5), prompt=[3], vocab_size=4)
    assert verify_greedy(tree, logits, adjust=penalties.apply) == ([0], 2)


def test_sampling_verification_keeps_the_adjusted_distribution():
    """Two drafted tokens against a frequency penalty that depends on the path: the emitted pair is
    distributed as sampling token by token from the adjusted rows."""
    vocab, trials = 4, 8000
    logits = torch.tensor([[1.0, 0.5, 0.0, 0.2], [1.0, 0.5, 0.0, 0.2], [0.3, 1.0, 0.0, 0.2]])
    tree = DraftTree.chain([0, 1])
    params = SamplingParams(temperature=1.0, frequency_penalty=1.0)
    penalties = Penalties(params, prompt=[2], vocab_size=vocab)
    g = torch.Generator().manual_seed(0)
    first, second_after_0 = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        path, bonus = verify_sampling(tree, logits, params, g, adjust=penalties.apply)
        emitted = [tree.tokens[i] for i in path] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 0:  # node 0 accepted (a point mass's residual never gives its token back)
            second_after_0[emitted[1]] += 1
    for observed, row in ((first, penalties.apply(logits[0])), (second_after_0, penalties.apply(logits[1], [0]))):
        assert chi_square_p_value(observed, torch.softmax(row, -1)) > 1e-3
    # Without the path's own adjustment, token 0 after token 0 would be far more likely.
    assert second_after_0[0] / second_after_0.sum() < torch.softmax(penalties.apply(logits[1]), -1)[0] - 0.1


@pytest.fixture(scope="module")
def penalised():
    return SamplingParams(max_new_tokens=48, presence_penalty=0.2, frequency_penalty=0.1, repetition_penalty=1.05,
                          logit_bias={13: -3.0})


@pytest.mark.parametrize("method", METHODS)
def test_penalties_are_exact_under_speculation(llm_default, penalised, method):
    accepted = 0
    for prompt in PROMPTS:
        expected = llm_default.generate(prompt, penalised, method="ar").token_ids
        result = llm_default.generate(prompt, penalised, method=method)
        assert result.token_ids == expected, f"{method} with penalties differs from ar on {prompt!r}"
        accepted += result.stats.accepted_tokens
    unpenalised = llm_default.generate(PROMPTS[0], SamplingParams(max_new_tokens=48), method="ar").token_ids
    assert unpenalised != llm_default.generate(PROMPTS[0], penalised, method="ar").token_ids, "the penalties changed nothing"
    assert accepted > 0 or method == "lookahead", f"{method} never had a draft accepted"


def test_logprobs_are_bitwise_equal_under_every_method(llm_default):
    params = SamplingParams(max_new_tokens=40, logprobs=5)
    plain = llm_default.generate(REPEATING, params, method="ar")
    assert len(plain.tokens) == len(plain.token_ids)
    for info, token in zip(plain.tokens, plain.token_ids):
        assert info.id == token and info.source == "target"
        assert info.logprob <= 0 and len(info.top) == 5
        assert info.top[0] == (token, info.logprob), "greedy picks the most likely token"
        assert all(a[1] >= b[1] for a, b in zip(info.top, info.top[1:]))
    assert all(sum(math.exp(lp) for _, lp in t.top) <= 1 + 1e-6 for t in plain.tokens)
    for method in ("ngram", "suffix", "auto"):
        result = llm_default.generate(REPEATING, params, method=method)
        assert result.token_ids == plain.token_ids
        assert [(t.logprob, t.top) for t in result.tokens] == [(t.logprob, t.top) for t in plain.tokens], method
        drafted = [t for t in result.tokens if t.source != "target"]
        assert len(drafted) == result.stats.accepted_tokens > 0, f"{method}: every accepted draft token is marked"
        allowed = {"ngram", "suffix", "ngram+suffix"} if method == "auto" else {method}
        assert {t.source for t in drafted} <= allowed


def test_no_logprobs_unless_asked(llm_default):
    result = llm_default.generate(REPEATING, SamplingParams(max_new_tokens=8), method="ngram")
    assert [t.id for t in result.tokens] == result.token_ids
    assert all(t.logprob is None and t.top == [] for t in result.tokens)


def test_scheduler_reports_each_steps_tokens_before_its_text(llm_default):
    from fastdecode.drafters import make_drafter
    from fastdecode.scheduler import Scheduler

    scheduler = Scheduler(llm_default.engine)
    events = []
    ids = llm_default.prompt_ids(REPEATING)
    request = scheduler.submit(ids, SamplingParams(max_new_tokens=30, logprobs=0), make_drafter("ngram"),
                               on_text=lambda text: events.append(("text", text)),
                               on_tokens=lambda tokens: events.append(("tokens", list(tokens))))
    scheduler.run()
    streamed = [t for kind, value in events if kind == "tokens" for t in value]
    assert [t.id for t in streamed] == request.result.token_ids
    assert [t.logprob for t in streamed] == [t.logprob for t in request.result.tokens]
    assert events[0][0] == "tokens"
