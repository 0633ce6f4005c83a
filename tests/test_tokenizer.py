"""Tokenizer: encode/decode, the chat template, message checks and incremental detokenization.

Runs on the real SmolLM2 tokenizer (byte-level BPE: accented letters, emoji and CJK characters
split into tokens that each hold only part of a character's UTF-8 bytes).
"""
from __future__ import annotations

import random

import pytest

from fastdecode.errors import FastDecodeError
from fastdecode.tokenizer import IncrementalDetokenizer

DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)

TEXTS = [
    "Hello, world!",
    "héllo wörld, ñandú, café crème brûlée, Øresund, ça va?",
    "😀🎉👍🏽 emoji family: 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "日本語のテキスト、中文字符，한국어 텍스트",
    "mixed: naïve façade — “quotes” … 💡日本 end",
    "  leading spaces and\nnewlines\n\n\ttabs  trailing ",
    "Ελληνικά русский עברית العربية हिन्दी",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥² ∑∫√ ≠ ≤",
    "def f(x):\n    return x ** 2  # ✓ ok\n",
    "a",
    "€",
    "🙂",
]


# --- encode / decode --------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_roundtrip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == text


def test_multibyte_characters_split_into_byte_tokens(tokenizer):
    # The premise of the detokenizer tests: some single tokens do not decode to whole characters.
    ids = tokenizer.encode("😀 日本語")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_encode_adds_no_special_tokens_for_smollm2(tokenizer):
    assert tokenizer.info.add_bos is False
    ids = tokenizer.encode("hi")
    assert tokenizer.info.bos_id not in ids
    assert not set(ids) & tokenizer.eos_ids


def test_decode_skips_special_tokens(tokenizer):
    eos = next(iter(tokenizer.eos_ids))
    ids = tokenizer.encode("Hello") + [eos]
    assert tokenizer.decode(ids) == "Hello"


# --- chat template ----------------------------------------------------------------------------


def test_chat_template_default_system_message(tokenizer):
    rendered = tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert rendered == DEFAULT_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_explicit_system_message(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
    ]
    assert tokenizer.render_chat(messages) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_multi_turn_and_no_generation_prompt(tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    expected = (
        DEFAULT_SYSTEM
        + "<|im_start|>user\nhi<|im_end|>\n"
        + "<|im_start|>assistant\nHello!<|im_end|>\n"
        + "<|im_start|>user\n2+2?<|im_end|>\n"
    )
    assert tokenizer.render_chat(messages, add_generation_prompt=False) == expected
    assert tokenizer.render_chat(messages) == expected + "<|im_start|>assistant\n"


def test_chat_template_matches_transformers(tokenizer):
    """Render with transformers' own apply_chat_template on the same template and tokenizer file."""
    transformers = pytest.importorskip("transformers")
    from fastdecode.models.gguf_cache import cache_folder
    from fastdecode.models.registry import DEFAULT_MODEL, MODELS

    folder = cache_folder(MODELS[DEFAULT_MODEL].gguf_path())
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    template = tokenizer.info.chat_template
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 😀 日本"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b\nc"},
            {"role": "user", "content": "  spaced  "},
        ],
    ]
    for messages in conversations:
        for gen_prompt in (True, False):
            expected = hf.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=gen_prompt
            )
            assert tokenizer.render_chat(messages, add_generation_prompt=gen_prompt) == expected
        expected_ids = hf.apply_chat_template(
            messages, chat_template=template, tokenize=True, add_generation_prompt=True
        )
        if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys"):
            expected_ids = expected_ids["input_ids"]
        assert tokenizer.encode_chat(messages) == list(expected_ids)


def test_encode_chat_uses_single_special_token_ids(tokenizer):
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    im_start, im_end = tokenizer.info.bos_id, next(iter(tokenizer.eos_ids))
    # system, user, assistant turns open; system and user turns close.
    assert ids.count(im_start) == 3
    assert ids.count(im_end) == 2
    assert ids[0] == im_start
    assert tokenizer.decode(ids[-3:]).endswith("assistant\n")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hi",
        None,
        [{"role": "bot", "content": "hi"}],
        [{"content": "hi"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": None}],
        [{"role": "user"}],
        ["hi"],
        [{"role": "user", "content": "ok"}, {"role": "robot", "content": "x"}],
    ],
    ids=lambda m: repr(m)[:40],
)
def test_bad_messages_raise(tokenizer, messages):
    with pytest.raises(FastDecodeError):
        tokenizer.render_chat(messages)
    with pytest.raises(FastDecodeError):
        tokenizer.encode_chat(messages)


def test_bad_message_errors_are_clear(tokenizer):
    with pytest.raises(FastDecodeError, match="non-empty list"):
        tokenizer.render_chat([])
    with pytest.raises(FastDecodeError, match="'bot'.*system, user, assistant"):
        tokenizer.render_chat([{"role": "bot", "content": "hi"}])
    with pytest.raises(FastDecodeError, match="message 1 .*string 'content'"):
        tokenizer.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": 3}])


# --- incremental detokenization ---------------------------------------------------------------


def _detok_pieces(tokenizer, ids, chunks):
    detok = IncrementalDetokenizer(tokenizer)
    pieces, i = [], 0
    for size in chunks:
        pieces.append(detok.add(ids[i : i + size]))
        i += size
    assert i == len(ids)
    final = detok.flush()
    return detok, pieces, final


def _random_chunks(n, rng):
    chunks = []
    while n > 0:
        size = rng.randint(1, min(n, 5))
        chunks.append(size)
        n -= size
    return chunks


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_one_token_at_a_time(tokenizer, text):
    ids = tokenizer.encode(text)
    detok, pieces, final = _detok_pieces(tokenizer, ids, [1] * len(ids))
    assert "".join(pieces) + final == tokenizer.decode(ids) == text
    assert detok.text == text
    assert all("\ufffd" not in p for p in pieces + [final])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_random_chunks(tokenizer, text, seed):
    ids = tokenizer.encode(text)
    chunks = _random_chunks(len(ids), random.Random(seed * 1000 + len(text)))
    detok, pieces, final = _detok_pieces(tokenizer, ids, chunks)
    assert "".join(pieces) + final == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces + [final])


def test_incremental_detokenizer_all_at_once(tokenizer):
    text = " ".join(TEXTS)
    ids = tokenizer.encode(text)
    detok, pieces, final = _detok_pieces(tokenizer, ids, [len(ids)])
    assert pieces == [text] and final == ""


def test_incremental_detokenizer_holds_back_partial_characters(tokenizer):
    ids = tokenizer.encode("ab😀")
    detok = IncrementalDetokenizer(tokenizer)
    seen = ""
    for i in ids:
        piece = detok.add([i])
        assert "\ufffd" not in piece
        seen += piece
        # What was released is always a prefix of the final text.
        assert "ab😀".startswith(seen)
    assert seen == "ab😀"


def test_incremental_detokenizer_flushes_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 😀")
    # Drop the last byte-level token: the emoji is now incomplete.
    truncated = ids[:-1]
    assert tokenizer.decode(truncated).endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in truncated]
    assert all("\ufffd" not in p for p in pieces)
    final = detok.flush()
    assert "\ufffd" in final
    assert "".join(pieces) + final == tokenizer.decode(truncated)


def test_incremental_detokenizer_ignores_special_tokens(tokenizer):
    eos = next(iter(tokenizer.eos_ids))
    ids = tokenizer.encode("Hi 日本")
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in ids] + [detok.add([eos]), detok.flush()]
    assert "".join(pieces) == "Hi 日本"


def test_incremental_detokenizer_random_token_streams(tokenizer):
    """Random sequences of real tokens (as a sampling model could emit), mixed with multi-byte ones."""
    rng = random.Random(1234)
    pool = sorted({i for t in TEXTS for i in tokenizer.encode(t)})
    for _ in range(30):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 25))]
        detok, pieces, final = _detok_pieces(tokenizer, ids, _random_chunks(len(ids), rng))
        assert "".join(pieces) + final == tokenizer.decode(ids)
