"""End-to-end behaviour of the decode loop on the real default model (plain `ar` decoding;
tests/test_methods.py runs every method)."""
from __future__ import annotations

import pytest

from fastdecode import SamplingParams
from fastdecode.drafters import make_drafter
from fastdecode.errors import FastDecodeError

PROMPT = "Say hi."
EOS_PROMPT = "Reply with one word: yes or no. Is the sky blue?"  # greedy: "No" then EOS


@pytest.fixture(scope="module")
def greedy(llm):
    """One greedy run reused by several tests (24 tokens, or fewer if EOS comes first)."""
    return llm.generate(PROMPT, SamplingParams(max_new_tokens=24), method="ar")


def test_greedy_is_deterministic(llm, greedy):
    again = llm.generate(PROMPT, SamplingParams(max_new_tokens=24), method="ar")
    assert again.token_ids == greedy.token_ids
    assert again.text == greedy.text
    assert greedy.text.strip()


def test_result_fields_are_consistent(llm, greedy):
    assert greedy.num_generated_tokens == len(greedy.token_ids)
    assert greedy.num_prompt_tokens == len(llm.prompt_ids(PROMPT))
    assert greedy.text == llm.tokenizer.decode(greedy.token_ids)
    assert greedy.method == "ar"
    assert greedy.model == "smollm2-135m-instruct"
    d = greedy.to_dict()
    assert d["text"] == greedy.text and d["token_ids"] == greedy.token_ids
    assert d["finish_reason"] == greedy.finish_reason


def test_length_finish(llm, greedy):
    result = llm.generate(PROMPT, SamplingParams(max_new_tokens=5), method="ar")
    assert result.finish_reason == "length"
    assert result.num_generated_tokens == 5
    assert result.token_ids == greedy.token_ids[:5]  # a shorter budget is a prefix of the longer run


def test_single_token(llm, greedy):
    result = llm.generate(PROMPT, SamplingParams(max_new_tokens=1), method="ar")
    assert result.finish_reason == "length"
    assert result.token_ids == greedy.token_ids[:1]
    assert result.stats.forward_passes == 1  # the prefill produces the first token


def test_eos_finish(llm):
    result = llm.generate(EOS_PROMPT, SamplingParams(max_new_tokens=16), method="ar")
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] in llm.tokenizer.eos_ids
    assert result.num_generated_tokens < 16
    assert all(t not in llm.tokenizer.eos_ids for t in result.token_ids[:-1])
    assert "<|im_end|>" not in result.text
    assert result.text == llm.tokenizer.decode(result.token_ids[:-1])
    assert result.text.strip()


def test_ignore_eos_runs_to_length(llm):
    result = llm.generate(EOS_PROMPT, SamplingParams(max_new_tokens=6, ignore_eos=True), method="ar")
    assert result.finish_reason == "length"
    assert result.num_generated_tokens == 6
    assert "<|im_end|>" not in result.text


def _stop_spanning_tokens(llm, result):
    """A stop string from the greedy text that straddles a token boundary, first occurring there."""
    text, ids = result.text, result.token_ids
    for k in range(3, len(ids) - 2):
        b = len(llm.tokenizer.decode(ids[:k]))
        stop = text[b - 2 : b + 2]
        if len(stop) == 4 and stop.strip() == stop and text.find(stop) == b - 2:
            return stop, b - 2
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string_finishes_generation(llm, greedy):
    stop, cut = _stop_spanning_tokens(llm, greedy)
    result = llm.generate(PROMPT, SamplingParams(max_new_tokens=24, stop=[stop]), method="ar")
    assert result.finish_reason == "stop"
    # Generation ended at the token completing the stop string, not at max_new_tokens.
    assert result.num_generated_tokens < greedy.num_generated_tokens
    assert result.token_ids == greedy.token_ids[: result.num_generated_tokens]
    assert len(llm.tokenizer.decode(result.token_ids)) >= cut + len(stop)


def test_stop_string_is_cut_from_text_and_stream(llm, greedy):
    stop, cut = _stop_spanning_tokens(llm, greedy)
    gen = llm.stream(PROMPT, SamplingParams(max_new_tokens=24, stop=[stop]), method="ar")
    streamed = "".join(gen)
    result = gen.result
    assert result.text == greedy.text[:cut]
    assert stop not in result.text
    assert streamed == result.text


def test_streaming_concatenates_to_final_text(llm, greedy):
    gen = llm.stream(PROMPT, SamplingParams(max_new_tokens=24), method="ar")
    assert gen.result is None
    pieces = list(gen)
    assert "".join(pieces) == gen.result.text == greedy.text
    assert len([p for p in pieces if p]) > 1  # really incremental


def test_stream_is_incremental(llm):
    """Every piece extends what was shown before; text arrives token by token, not at the end."""
    gen = llm.stream(PROMPT, SamplingParams(max_new_tokens=8), method="ar")
    shown = ""
    for piece in gen:
        shown += piece
        assert gen.result is None  # the result exists only once iteration ends
    text = gen.result.text
    assert shown == text
    pieces = list(llm.stream(PROMPT, SamplingParams(max_new_tokens=8), method="ar"))
    assert len([p for p in pieces if p]) >= gen.result.num_generated_tokens // 2


def test_sampling_seeded(llm):
    params = lambda seed: SamplingParams(temperature=1.0, seed=seed, max_new_tokens=12)  # noqa: E731
    a = llm.generate("Tell me a story.", params(1), method="ar")
    b = llm.generate("Tell me a story.", params(1), method="ar")
    c = llm.generate("Tell me a story.", params(2), method="ar")
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_sampling_with_top_k_one_equals_greedy(llm, greedy):
    result = llm.generate(PROMPT, SamplingParams(temperature=0.8, top_k=1, seed=3, max_new_tokens=10), method="ar")
    assert result.token_ids == greedy.token_ids[:10]


def test_ar_statistics(llm, greedy):
    s = greedy.stats
    assert greedy.num_prompt_tokens < 512  # one prefill chunk
    assert s.forward_passes == greedy.num_generated_tokens
    assert s.num_generated_tokens == greedy.num_generated_tokens
    assert s.num_prompt_tokens == greedy.num_prompt_tokens
    assert s.mean_acceptance_length == 1.0
    assert s.acceptance_rate is None
    assert s.drafts == s.draft_tokens == s.accepted_tokens == 0
    d = s.to_dict()
    assert d["forward_passes"] == greedy.num_generated_tokens
    assert d["mean_acceptance_length"] == 1.0 and d["acceptance_rate"] is None
    assert d["wall_time_s"] > 0 and d["tokens_per_s"] > 0


def test_long_prompt_prefills_in_chunks(llm):
    from fastdecode.sequence import PREFILL_CHUNK

    ids = llm.tokenizer.encode(" the" * (PREFILL_CHUNK + 20))
    assert PREFILL_CHUNK < len(ids) <= 2 * PREFILL_CHUNK
    result = llm.engine.generate(ids, SamplingParams(max_new_tokens=3), make_drafter("ar"))
    assert result.num_prompt_tokens == len(ids)
    assert result.stats.forward_passes == 2 + (result.num_generated_tokens - 1)


def test_prompt_longer_than_context_window(llm):
    window = llm.engine.context_window
    assert window == 8192
    token = llm.tokenizer.encode(" the")[0]
    for n in (window, window + 100):
        with pytest.raises(FastDecodeError, match="context window") as info:
            llm.engine.generate([token] * n, SamplingParams(), make_drafter("ar"))
        assert str(n) in str(info.value) and str(window) in str(info.value)


def test_empty_prompt_raises(llm):
    with pytest.raises(FastDecodeError, match="empty"):
        llm.engine.generate([], SamplingParams(), make_drafter("ar"))


def test_unknown_method(llm):
    with pytest.raises(FastDecodeError, match="unknown method 'nope'.*ar"):
        llm.generate("hi", SamplingParams(max_new_tokens=2), method="nope")
    with pytest.raises(FastDecodeError, match="has no option 'depth'"):
        llm.generate("hi", SamplingParams(max_new_tokens=2), method="ar", depth=3)


def test_raw_and_chat_prompts(llm):
    raw = llm.generate("hi", SamplingParams(max_new_tokens=2), raw=True, method="ar")
    chat = llm.generate("hi", SamplingParams(max_new_tokens=2), method="ar")
    assert raw.num_prompt_tokens == len(llm.tokenizer.encode("hi"))
    assert chat.num_prompt_tokens == len(llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}]))
    assert raw.num_prompt_tokens < chat.num_prompt_tokens
    messages = [{"role": "user", "content": "hi"}]
    assert llm.prompt_ids(messages) == llm.prompt_ids("hi")
    with pytest.raises(FastDecodeError, match="raw"):
        llm.prompt_ids(messages, raw=True)
    with pytest.raises(FastDecodeError):
        llm.generate([], SamplingParams(max_new_tokens=2), method="ar")


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_out_of_range_seed_is_a_user_error(seed):
    with pytest.raises(FastDecodeError, match="seed"):
        SamplingParams(temperature=1.0, seed=seed, max_new_tokens=2)
