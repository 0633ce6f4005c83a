"""Every method against plain decoding, on the real default model in the default dtype:
greedy output token for token, and sampled tokens from the same distribution."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.drafters import METHODS
from fastdecode.errors import FastDecodeError
from fastdecode.heads import HEAD_KINDS
from fastdecode.models.truncate import make_truncated_checkpoint
from fastdecode.runtime.sampling import target_probabilities

from stats import chi_square_p_value

SPECULATIVE = [m for m in METHODS if m != "ar" and METHODS[m].lossless]  # the lossy one is labelled, not exact
PROMPTS = [
    "Rewrite this sentence three times: The quick brown fox jumps over the lazy dog.",
    "What are the three primary colors? Answer briefly.",
    "Write a Python function that returns the factorial of n.",
]


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory):
    return str(make_truncated_checkpoint("smollm2-135m-instruct", 24, tmp_path_factory.mktemp("draft24")))


def _options(method: str, draft_folder: str) -> dict:
    return {"draft_model": draft_folder} if method == "draft" else {}


@pytest.fixture(scope="module")
def plain(llm_default):
    return [llm_default.generate(p, SamplingParams(max_new_tokens=64), method="ar").token_ids for p in PROMPTS]


@pytest.mark.parametrize("method", SPECULATIVE)
def test_greedy_output_equals_plain_decoding(llm_default, plain, method, draft_folder):
    drafted = accepted = 0
    for prompt, expected in zip(PROMPTS, plain):
        result = llm_default.generate(prompt, SamplingParams(max_new_tokens=64), method=method, **_options(method, draft_folder))
        assert result.token_ids == expected, f"{method} differs from ar on {prompt!r}"
        assert result.method == method
        drafted += result.stats.draft_tokens
        accepted += result.stats.accepted_tokens
    assert drafted > 0 and accepted > 0, f"{method} never drafted or never had a token accepted"


@pytest.mark.parametrize("method", SPECULATIVE)
def test_tiny_budgets_and_eos(llm_default, method, draft_folder):
    """1 to 3 new tokens leave little or no room to draft; an early EOS ends every method alike."""
    options = _options(method, draft_folder)
    for n in (1, 2, 3):
        expected = llm_default.generate(PROMPTS[0], SamplingParams(max_new_tokens=n), method="ar")
        result = llm_default.generate(PROMPTS[0], SamplingParams(max_new_tokens=n), method=method, **options)
        assert result.token_ids == expected.token_ids and result.finish_reason == "length"
    eos_prompt = "Reply with one word: yes or no. Is the sky blue?"
    expected = llm_default.generate(eos_prompt, SamplingParams(max_new_tokens=16), method="ar")
    result = llm_default.generate(eos_prompt, SamplingParams(max_new_tokens=16), method=method, **options)
    assert result.token_ids == expected.token_ids and result.finish_reason == expected.finish_reason == "stop"


# A prompt that invites drafting from the first steps (its text repeats), sampled at a temperature
# with top-k so that the first three tokens fall into at most 27 categories.
SAMPLING_PROMPT = "red green blue red green blue red green blue red green"
SAMPLING = dict(temperature=1.0, top_k=3, max_new_tokens=3)
RUNS = 150


@pytest.fixture(scope="module")
def exact_triples(llm_default):
    """The exact joint distribution of the first three generated tokens (the 2nd and 3rd come
    out of verification), from the target model's own filtered probabilities."""
    llm = llm_default
    ids = llm.prompt_ids(SAMPLING_PROMPT, raw=True)
    params = SamplingParams(**SAMPLING)
    model = llm.engine.model

    def next_probs(context):
        cache = model.new_cache(len(context))
        logits = model.forward(torch.tensor(context), torch.arange(len(context)), cache, last_logits_only=True)
        return target_probabilities(logits, params)[0]

    def support(p):
        return [(t, float(p[t])) for t in p.nonzero().flatten().tolist()]

    def extend(prefix, prob):  # a sequence ends at EOS or at three tokens
        if len(prefix) == 3 or (prefix and prefix[-1] in llm.tokenizer.eos_ids):
            triples[tuple(prefix)] = prob
            return
        for token, p in support(next_probs(ids + prefix)):
            extend(prefix + [token], prob * p)

    triples = {}
    extend([], 1.0)
    return ids, triples


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].lossless])
def test_sampled_tokens_follow_the_target_distribution(llm_default, exact_triples, method, draft_folder):
    ids, triples = exact_triples
    engine = llm_default.engine
    # The trained heads draft on every step here (they would rest on a CPU where they do not pay),
    # so that their draft distributions q meet verification on every step; lud hangs its second
    # placeholder chain (after the draft's first node) whenever it drafts, so that it drafts too.
    trained = {"rest": False} if method in HEAD_KINDS else {"hang_above": 0.0} if method == "lud" else {}
    drafter = llm_default.drafter(method, **_options(method, draft_folder), **trained)
    counts, drafted = Counter(), 0
    for seed in range(RUNS):
        result = engine.generate(ids, SamplingParams(seed=seed, **SAMPLING), drafter)
        drafted += result.stats.draft_tokens
        counts[tuple(result.token_ids)] += 1
    keys = sorted(triples)
    observed = torch.tensor([counts.pop(k, 0) for k in keys], dtype=torch.float64)
    assert not counts, f"{method} produced token sequences the target cannot: {counts}"
    assert chi_square_p_value(observed, torch.tensor([triples[k] for k in keys])) > 1e-3
    if method != "ar":
        assert drafted > 0, f"{method} never drafted, so this test did not exercise its verification"


def test_unknown_method_lists_the_methods(llm_default):
    with pytest.raises(FastDecodeError, match="available methods: ar, ngram"):
        llm_default.generate("hi", method="telepathy")


def test_an_option_of_another_method_is_refused(llm_default):
    with pytest.raises(FastDecodeError, match="has no option 'draft_model'; it belongs to method draft"):
        llm_default.generate("hi", method="ngram", draft_model="x")


INT8_METHODS = """
import json
from fastdecode import LLM, SamplingParams
from fastdecode.drafters import make_drafter
from fastdecode.kernels import kernel_description
from fastdecode.scheduler import Scheduler
llm = LLM()
assert "int8 activations" in kernel_description(), kernel_description()
prompts = {prompts!r}
params = SamplingParams(max_new_tokens=48)
plain = [llm.generate(p, params, method="ar").token_ids for p in prompts]
drafted = {{}}
for method in ("ngram", "suffix", "lookahead", "eagle", "hydra", "auto"):
    for p, expected in zip(prompts, plain):
        result = llm.generate(p, params, method=method)
        assert result.token_ids == expected, (method, p)
        drafted[method] = drafted.get(method, 0) + result.stats.accepted_tokens
scheduler = Scheduler(llm.engine, max_batch=3)
requests = [scheduler.submit(llm.prompt_ids(p), params, make_drafter(m, llm.target))
            for p, m in zip(prompts, ("ar", "suffix", "auto"))]
scheduler.run()
assert [r.result.token_ids for r in requests] == plain
print(json.dumps(drafted))
"""


@pytest.mark.slow
def test_int8_activations_keep_every_method_exact():
    """With FASTDECODE_INT8=1 (where the CPU runs it) each method still equals plain decoding in the
    same mode, alone and in a batch: the integer products keep a row's result independent of the
    other rows, as the float ones do."""
    import json
    import os
    import subprocess
    import sys

    from fastdecode.kernels import kernel_description

    if not kernel_description().startswith("native kernels: AVX2"):
        pytest.skip("int8 activations run on the AVX2 path only")
    done = subprocess.run([sys.executable, "-c", INT8_METHODS.format(prompts=PROMPTS)], capture_output=True, text=True,
                          env={**os.environ, "FASTDECODE_INT8": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    accepted = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(n > 0 for n in accepted.values()), accepted  # every method had drafts verified
