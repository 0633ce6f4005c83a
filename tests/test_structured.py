"""Structured output (runtime/grammar.py): constrained decoding is the model's distribution restricted
to what the grammar allows, and every method gives constrained `ar`'s output: token for token under
greedy, in distribution under sampling. Drafts the grammar forbids are cut before the forward, and
the tokens it forces are drafted with certainty."""
from __future__ import annotations

import json

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.errors import FastDecodeError
from fastdecode.runtime.grammar import Constraint, Grammar
from fastdecode.runtime.sampling import target_probabilities
from fastdecode.runtime.tree import DraftTree
from fastdecode.runtime.verify import verify_sampling

from stats import chi_square_p_value

jsonschema = pytest.importorskip("jsonschema")

WIDTH = 49152  # the default model's logits
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                         "city": {"type": "string", "maxLength": 20}}}
PROMPT = "Invent a person and give their name, age and city as JSON."
METHODS = ["ngram", "suffix", "recycling", "lookahead", "layerskip", "auto"]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def test_bad_constraints_get_clear_errors(tokenizer):
    with pytest.raises(FastDecodeError, match="not valid JSON"):
        Constraint("json_schema", "{not json")
    with pytest.raises(FastDecodeError, match="constraint kind"):
        Constraint("yaml", "a: 1")
    with pytest.raises(FastDecodeError, match="regex"):
        Grammar(Constraint("regex", "("), tokenizer, WIDTH)
    with pytest.raises(FastDecodeError, match="bogus-format"):
        Grammar(Constraint.json_schema({"type": "string", "format": "bogus-format"}), tokenizer, WIDTH)
    with pytest.raises(FastDecodeError, match="constraint"):
        SamplingParams(constraint={"type": "object"})
    with pytest.raises(FastDecodeError, match="ignore_eos"):
        SamplingParams(constraint=Constraint("json_object"), ignore_eos=True)


def test_grammar_state_follows_paths_and_rolls_back(tokenizer):
    """Verification walks one path after another down a tree; what it walked goes back, and the
    state after committing equals a fresh grammar fed the same tokens."""
    grammar = Grammar(Constraint("regex", "(cat|car|dog)s?"), tokenizer, WIDTH)
    fresh = Grammar(Constraint("regex", "(cat|car|dog)s?"), tokenizer, WIDTH)
    c, d = ids(tokenizer, "c")[0], ids(tokenizer, "d")[0]
    at_start = grammar.allowed()
    assert at_start[c] and at_start[d] and at_start.sum() < 100
    after_c = grammar.allowed([c])
    assert not after_c[c] and after_c[ids(tokenizer, "a")[0]]
    grammar.allowed([d])  # another branch of the tree
    assert torch.equal(grammar.allowed([c]), after_c)
    grammar.commit([d])
    fresh.commit([d])
    assert torch.equal(grammar.allowed(), fresh.allowed())
    assert grammar.forced() == fresh.forced() == ids(tokenizer, "og")[:len(grammar.forced())]


def test_a_path_through_the_end_of_sequence_rolls_back_exactly(tokenizer):
    """The matcher does not count an end-of-sequence token among those a rollback undoes: a verify
    path through one must not cost the committed tokens."""
    grammar = Grammar(Constraint("regex", "ab"), tokenizer, WIDTH)
    a, b, eos = ids(tokenizer, "a")[0], ids(tokenizer, "b")[0], min(tokenizer.eos_ids)
    assert grammar.allowed([a, b])[eos]
    grammar.allowed([a, b, eos])
    grammar.commit([a])
    assert grammar.allowed()[b], "the committed token survived the walk back"


def test_forbidden_drafts_are_cut_and_forced_tokens_drafted(tokenizer):
    grammar = Grammar(Constraint("regex", "(cat|car)s"), tokenizer, WIDTH)
    c, a, t, r, x = (ids(tokenizer, ch)[0] for ch in "catrx")
    tree = DraftTree([c, a, t, r, x, x], [-1, 0, 1, 1, 0, -1])  # c-a-t, c-a-r, c-x, x
    assert grammar.allowed_nodes(tree) == [0, 1, 2, 3]
    # After "ca", the grammar forces nothing ("r" or "t"); after "cat" it forces "s".
    grammar.commit([c, a])
    assert grammar.with_forced(tree, 8, "ngram")[0] is tree
    grammar.commit([t])
    s = ids(tokenizer, "s")[0]
    drafted = DraftTree([s, x], [-1, 0], scores=[0.5, 0.25])  # the drafter guessed "s" (and more)
    merged, origin = grammar.with_forced(drafted, 8, "ngram")
    assert merged.tokens == [s, x] and merged.scores == [1.0, 0.25] and origin == [0, 1]
    assert merged.sources == ["ngram", "ngram"]
    merged, origin = grammar.with_forced(DraftTree([x], [-1], scores=[0.5]), 8, "ngram")
    assert merged.tokens == [x, s] and merged.parents == [-1, -1] and merged.scores == [0.5, 1.0]
    assert origin == [0, -1] and merged.sources == ["ngram", "grammar"]
    assert grammar.with_forced(DraftTree([x], [-1], scores=[0.5]), 1, "ngram")[0].tokens == [x], "within budget"


def test_sampling_verification_keeps_the_constrained_distribution(tokenizer):
    """Drafts verified against each row's own grammar state: the emitted tokens are distributed as
    sampling token by token from the masked, renormalised rows."""
    torch.manual_seed(0)
    logits = torch.randn(3, WIDTH) * 2
    constraint = Constraint("regex", "(ab|ac|b)")
    a, b = ids(tokenizer, "a")[0], ids(tokenizer, "b")[0]
    tree = DraftTree.chain([a, b])
    params = SamplingParams(temperature=1.0)
    fresh = Grammar(constraint, tokenizer, WIDTH)
    first_p = target_probabilities(fresh.restrict(logits[0])[None], params)[0]
    second_p = target_probabilities(fresh.restrict(logits[1], [a])[None], params)[0]
    assert (first_p > 0).sum() >= 3 and (second_p > 0).sum() >= 2
    first, second = torch.zeros(WIDTH), torch.zeros(WIDTH)
    g = torch.Generator().manual_seed(1)
    grammar = Grammar(constraint, tokenizer, WIDTH)
    for _ in range(2000):
        grammar.commit([])  # back to the start: verification only walked paths
        path, bonus = verify_sampling(tree, logits, params, g, adjust=grammar.restrict)
        emitted = [tree.tokens[i] for i in path] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == a:
            second[emitted[1]] += 1
    assert chi_square_p_value(first, first_p) > 1e-3
    assert chi_square_p_value(second, second_p) > 1e-3


@pytest.fixture(scope="module")
def constrained_ar(llm_default):
    params = SamplingParams(max_new_tokens=80, constraint=Constraint.json_schema(PERSON))
    return params, llm_default.generate(PROMPT, params, method="ar")


def test_constrained_output_follows_the_schema(constrained_ar):
    _, result = constrained_ar
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), PERSON)
    assert {t.source for t in result.tokens} == {"target"}, "ar drafts nothing, not even forced tokens"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_constrained_ar_token_for_token(llm_default, constrained_ar, method):
    params, expected = constrained_ar
    result = llm_default.generate(PROMPT, params, method=method)
    assert result.token_ids == expected.token_ids
    forced = [t for t in result.tokens if t.source == "grammar"]
    assert forced, f"{method}: no forced token was drafted and accepted"
    assert result.stats.forward_passes < expected.stats.forward_passes


def test_regex_and_lark_grammars(llm_default):
    regex = SamplingParams(max_new_tokens=16, constraint=Constraint("regex", r"The answer is [0-9]+\."))
    result = llm_default.generate("What is 2 + 2?", regex, method="auto")
    assert result.text == "The answer is 4." and result.finish_reason == "stop"
    lark = 'start: "Colors: " color (", " color)*\ncolor: "red" | "green" | "blue"'
    grammar = SamplingParams(max_new_tokens=24, constraint=Constraint("grammar", lark))
    plain = llm_default.generate("Name some colors.", grammar, method="ar")
    assert plain.text.startswith("Colors: ")
    assert llm_default.generate("Name some colors.", grammar, method="ngram").token_ids == plain.token_ids


def test_sampled_constrained_speculation_keeps_the_distribution_on_a_tiny_model(tmp_path, tiny_model):
    """The whole decode loop, sampling under a grammar on a tiny random model: the answers of
    constrained ngram and auto (drafts from the prompt and the grammar's forced tokens, verified by
    rejection sampling against masked rows) are distributed as constrained ar's."""
    import re

    from conftest import byte_tokenizer
    from fastdecode.drafters import make_drafter
    from fastdecode.engine import Engine
    from fastdecode.runtime.cost_curve import CostCurve

    from stats import two_sample_p_value

    engine = Engine(tiny_model, byte_tokenizer(tmp_path, 97, eos_id=96), "tiny")
    engine.cost_curve = CostCurve([1, 8, 64], [0.01, 0.011, 0.03])  # cheap rows: verify what is proposed
    pattern = "(ab|ac|bc)(ab|ba|cc)d"
    outcomes = [a + b + "d" for a in ("ab", "ac", "bc") for b in ("ab", "ba", "cc")]
    prompt = engine.tokenizer.encode("abcd abab acba bcccd abba")
    params = lambda seed: SamplingParams(temperature=1.0, seed=seed, max_new_tokens=8,  # noqa: E731
                                         constraint=Constraint("regex", pattern))
    counts = {}
    for method in ("ar", "ngram", "auto"):
        drafter = make_drafter(method, engine) if method != "ar" else make_drafter("ar")
        seen = torch.zeros(len(outcomes))
        drafted = 0
        for seed in range(600):
            result = engine.generate(prompt, params(seed), drafter)
            assert result.finish_reason == "stop" and result.token_ids[-1] == 96
            text = engine.tokenizer.decode(result.token_ids[:-1])  # EOS is a byte of this tokenizer
            assert re.fullmatch(pattern, text), text
            seen[outcomes.index(text)] += 1
            drafted += result.stats.accepted_tokens
        counts[method] = seen
        assert method == "ar" or drafted > 0, f"{method} never had a draft accepted"
    assert (counts["ar"] > 0).sum() >= 4, "the tiny model should spread over several answers"
    for method in ("ngram", "auto"):
        assert two_sample_p_value(counts["ar"], counts[method]) > 1e-3, (method, counts)
