"""SamplingParams validation, the logits -> probabilities filters, and sampling frequencies."""
from __future__ import annotations

import math
import random

import pytest
import torch

from fastdecode.errors import FastDecodeError
from fastdecode.runtime.sampling import SamplingParams, next_tokens, sample, target_probabilities

try:
    import scipy.stats as scipy_stats
except ImportError:  # not a dependency: fall back to a fixed critical value
    scipy_stats = None


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": -0.01}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "0.7"}, "temperature"),
        ({"temperature": None}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 8.0}, "max_new_tokens"),
        ({"seed": "42"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop": ""}, "stop"),
    ],
)
def test_invalid_params_raise_clear_error(kwargs, field):
    with pytest.raises(FastDecodeError, match=rf"invalid sampling parameters: {field} must"):
        SamplingParams(**kwargs)


def test_error_messages_state_the_valid_range():
    cases = [
        ({"temperature": -1}, ">= 0"),
        ({"top_p": 1.5}, "(0, 1]"),
        ({"top_k": -1}, "integer >= 0"),
        ({"min_p": 2}, "[0, 1]"),
        ({"max_new_tokens": 0}, "integer >= 1"),
        ({"seed": "x"}, "integer"),
    ]
    for kwargs, text in cases:
        with pytest.raises(FastDecodeError) as info:
            SamplingParams(**kwargs)
        assert text in str(info.value)


def test_valid_edge_values_are_accepted():
    p = SamplingParams(temperature=0, top_p=1, top_k=0, min_p=0, max_new_tokens=1, seed=0)
    assert p.greedy
    p = SamplingParams(temperature=1e-3, top_p=1e-6, top_k=1, min_p=1.0, seed=2**63 - 1, stop="END")
    assert not p.greedy
    assert p.stop == ["END"]  # a single string becomes a list
    assert SamplingParams().greedy and SamplingParams().stop == []


# --- target_probabilities ---------------------------------------------------------------------


def logits_for(probs):
    """Logits whose softmax at temperature 1 is `probs` (zeros become -inf)."""
    return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in probs]], dtype=torch.float32)


def check(logits, params, expected, atol=1e-6):
    got = target_probabilities(logits, params)
    assert got.shape == logits.shape
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32).reshape(got.shape), atol=atol, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[0]), atol=1e-6, rtol=0)


def test_greedy_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    check(logits, SamplingParams(temperature=0), [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_temperature_one_is_plain_softmax():
    check(logits_for([0.1, 0.2, 0.3, 0.4]), SamplingParams(temperature=1.0), [0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("temperature", [0.5, 2.0, 0.1])
def test_temperature_scales_logits(temperature):
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    e = [math.exp(x / temperature) for x in (1.0, 2.0, 3.0)]
    check(logits, SamplingParams(temperature=temperature), [x / sum(e) for x in e])


def test_top_k():
    check(logits_for([0.1, 0.2, 0.3, 0.4]), SamplingParams(temperature=1.0, top_k=2), [0, 0, 3 / 7, 4 / 7])
    check(logits_for([0.3, 0.1, 0.4, 0.2]), SamplingParams(temperature=1.0, top_k=1), [0, 0, 1, 0])
    # k at or above the vocabulary size keeps everything.
    for k in (4, 100):
        check(logits_for([0.1, 0.2, 0.3, 0.4]), SamplingParams(temperature=1.0, top_k=k), [0.1, 0.2, 0.3, 0.4])


def test_top_p_keeps_smallest_set_reaching_threshold():
    # Unsorted on purpose: 0.4 and 0.3 reach 0.65, 0.4 alone does not.
    check(logits_for([0.2, 0.4, 0.1, 0.3]), SamplingParams(temperature=1.0, top_p=0.65), [0, 4 / 7, 0, 3 / 7])
    # A tiny top_p keeps only the most likely token.
    check(logits_for([0.2, 0.4, 0.1, 0.3]), SamplingParams(temperature=1.0, top_p=0.01), [0, 1, 0, 0])
    # Just above a cumulative mass: one more token is needed.
    check(logits_for([0.5, 0.25, 0.125, 0.0625, 0.0625]), SamplingParams(temperature=1.0, top_p=0.76),
          [0.5 / 0.875, 0.25 / 0.875, 0.125 / 0.875, 0, 0])


def test_top_p_threshold_hit_exactly():
    # 0.5 + 0.25 == 0.75 exactly (powers of two): the third token is not needed.
    check(logits_for([0.5, 0.25, 0.125, 0.125]), SamplingParams(temperature=1.0, top_p=0.75), [2 / 3, 1 / 3, 0, 0])
    check(logits_for([0.5, 0.3, 0.2]), SamplingParams(temperature=1.0, top_p=0.8), [0.625, 0.375, 0])
    check(logits_for([0.5, 0.25, 0.25]), SamplingParams(temperature=1.0, top_p=0.5), [1, 0, 0])


def test_top_p_one_is_off():
    check(logits_for([0.1, 0.2, 0.3, 0.4]), SamplingParams(temperature=1.0, top_p=1.0), [0.1, 0.2, 0.3, 0.4])


def test_min_p():
    # Threshold 0.3 * 0.4 = 0.12 drops 0.1 only.
    check(logits_for([0.4, 0.3, 0.2, 0.1]), SamplingParams(temperature=1.0, min_p=0.3), [4 / 9, 3 / 9, 2 / 9, 0])
    # A token exactly at the threshold (0.5 * 0.5 = 0.25) is kept; only tokens below it go.
    check(logits_for([0.5, 0.25, 0.125, 0.125]), SamplingParams(temperature=1.0, min_p=0.5), [2 / 3, 1 / 3, 0, 0])
    # min_p 1 keeps only the most likely token.
    check(logits_for([0.4, 0.3, 0.2, 0.1]), SamplingParams(temperature=1.0, min_p=1.0), [1, 0, 0, 0])


def test_filters_combine_in_order():
    # Temperature 2 on doubled log-probs gives back [0.4, 0.3, 0.2, 0.1].
    logits = 2 * logits_for([0.4, 0.3, 0.2, 0.1])
    # top-k 3 leaves [0.4, 0.3, 0.2] (mass 0.9); top-p 0.7 of that (0.63) keeps 0.4 and 0.3.
    check(logits, SamplingParams(temperature=2.0, top_k=3, top_p=0.7), [4 / 7, 3 / 7, 0, 0])
    # ... then min-p 0.8 (threshold 0.32) drops 0.3.
    check(logits, SamplingParams(temperature=2.0, top_k=3, top_p=0.7, min_p=0.8), [1, 0, 0, 0])
    # ... min-p 0.5 (threshold 0.2) keeps both.
    check(logits, SamplingParams(temperature=2.0, top_k=3, top_p=0.7, min_p=0.5), [4 / 7, 3 / 7, 0, 0])


def test_top_p_applies_to_what_top_k_left():
    # top-k 2 leaves 0.4 and 0.3; top-p 0.55 of the renormalised [4/7, 3/7] is reached by 4/7 alone.
    check(logits_for([0.4, 0.3, 0.2, 0.1]), SamplingParams(temperature=1.0, top_k=2, top_p=0.55), [1, 0, 0, 0])


def reference(logits_row, params):
    """The documented semantics in float64 Python, for comparison on random logits."""
    t = params.temperature
    m = max(logits_row)
    e = [math.exp((x - m) / t) for x in logits_row]
    p = [x / sum(e) for x in e]
    keep = set(range(len(p)))
    if params.top_k:
        keep &= set(sorted(keep, key=lambda i: -p[i])[: params.top_k])
    if params.top_p < 1:
        total = sum(p[i] for i in keep)
        mass, kept = 0.0, set()
        for i in sorted(keep, key=lambda i: -p[i]):
            if mass >= params.top_p * total:
                break
            kept.add(i)
            mass += p[i]
        keep = kept
    if params.min_p:
        top = max(p[i] for i in keep)
        keep = {i for i in keep if p[i] >= params.min_p * top}
    z = sum(p[i] for i in keep)
    return [p[i] / z if i in keep else 0.0 for i in range(len(p))]


def test_matches_reference_on_random_logits():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        logits = torch.randn(3, 40, generator=g) * rng.choice([0.5, 2.0, 5.0])
        params = SamplingParams(
            temperature=rng.choice([0.3, 0.7, 1.0, 1.5]),
            top_k=rng.choice([0, 1, 5, 20]),
            top_p=rng.choice([1.0, 0.9, 0.5, 0.2]),
            min_p=rng.choice([0.0, 0.05, 0.3]),
        )
        got = target_probabilities(logits, params)
        expected = torch.tensor([reference(row.tolist(), params) for row in logits.double()], dtype=torch.float32)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.sum(-1), torch.ones(3), atol=1e-5, rtol=0)
        assert (got >= 0).all()


def test_rows_are_independent():
    logits = torch.cat([logits_for([0.1, 0.2, 0.3, 0.4]), logits_for([0.4, 0.3, 0.2, 0.1])])
    check(logits, SamplingParams(temperature=1.0, top_k=2), [[0, 0, 3 / 7, 4 / 7], [4 / 7, 3 / 7, 0, 0]])


# --- sample / next_tokens ---------------------------------------------------------------------


def chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


def test_sample_frequencies_match_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 20000
    g = torch.Generator().manual_seed(1234)
    draws = sample(probs.expand(n, -1).contiguous(), g)
    assert draws.shape == (n,)
    counts = torch.bincount(draws, minlength=5).tolist()
    assert counts[4] == 0  # probability 0 is never drawn
    stat = chi_square(counts, probs.tolist())
    dof = 3
    critical = scipy_stats.chi2.ppf(0.999, dof) if scipy_stats else 16.266  # chi2(3) at p = 0.001
    assert stat < critical, (counts, stat)
    # And the draws are not degenerate: each non-zero token appears at a sensible rate.
    for c, p in zip(counts, probs.tolist()):
        assert abs(c / n - p) < 0.02


def test_sample_frequencies_after_filters():
    logits = logits_for([0.4, 0.3, 0.2, 0.1])
    probs = target_probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    g = torch.Generator().manual_seed(7)
    n = 10000
    draws = sample(probs.expand(n, -1).contiguous(), g)
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    critical = scipy_stats.chi2.ppf(0.999, 1) if scipy_stats else 10.828  # chi2(1) at p = 0.001
    assert chi_square(counts, probs[0].tolist()) < critical, counts


def test_same_seed_same_samples_different_seed_different():
    probs = torch.full((500, 10), 0.1)
    a = sample(probs, torch.Generator().manual_seed(42))
    b = sample(probs, torch.Generator().manual_seed(42))
    c = sample(probs, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_one_hot_rows():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    for seed in range(5):
        assert sample(probs, torch.Generator().manual_seed(seed)).tolist() == [1, 2, 0]


def test_next_tokens_greedy_and_top_k_one():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.9], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
    assert next_tokens(logits, SamplingParams(), None).tolist() == [1, 0, 3]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert next_tokens(logits, SamplingParams(temperature=1.5, top_k=1), g).tolist() == [1, 0, 3]


def test_next_tokens_sampling_is_seeded():
    logits = torch.zeros(200, 16)
    params = SamplingParams(temperature=1.0)
    a = next_tokens(logits, params, torch.Generator().manual_seed(5))
    b = next_tokens(logits, params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 8  # uniform over 16 tokens: draws are spread out
