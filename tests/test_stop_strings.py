"""TextOutput: stop strings cut the text, and streaming never shows what the final text cuts."""
from __future__ import annotations

import random

import pytest

from fastdecode.stop_strings import TextOutput

def feed(tokenizer, text, stop, chunks=None):
    """Feed the tokens of `text` (in chunks) until a stop string is found, as the engine does.

    Returns the TextOutput and the pieces its add() calls returned (finish() not called)."""
    ids = tokenizer.encode(text)
    chunks = chunks or [1] * len(ids)
    out = TextOutput(tokenizer, stop)
    pieces, i = [], 0
    for size in chunks:
        pieces.append(out.add(ids[i : i + size]))
        i += size
        if out.stopped:
            break
    return out, pieces


def expected_cut(text, stop):
    hits = [text.find(s) for s in stop if s in text]
    return text[: min(hits)] if hits else text


CASES = [
    ("The quick brown fox jumps over the lazy dog", [" fox"]),
    ("The quick brown fox jumps over the lazy dog", ["ick bro"]),  # spans two tokens
    ("The quick brown fox jumps over the lazy dog", ["uic"]),  # inside one token
    ("The quick brown fox jumps over the lazy dog", ["dog", "fox", "zzz"]),  # earliest wins
    ("The quick brown fox jumps over the lazy dog", ["The"]),  # at the very start: empty text
    ("The quick brown fox jumps over the lazy dog", ["g"]),  # the last character
    ("one\n\nUser: two\n\nUser: three", ["\nUser:"]),
    ("aaaab aab", ["aab"]),  # a partial match that restarts
    ("Price: 5€ or 😀 smile", ["😀"]),  # a stop string made of byte-level tokens
    ("日本語のテキスト", ["テキ"]),
    ("café crème", ["é c"]),
]


@pytest.mark.parametrize("text,stop", CASES)
@pytest.mark.parametrize("chunking", ["one", "random", "all"])
def test_stop_string_cuts_text_and_stream(tokenizer, text, stop, chunking):
    ids = tokenizer.encode(text)
    if chunking == "one":
        chunks = [1] * len(ids)
    elif chunking == "all":
        chunks = [len(ids)]
    else:
        rng, chunks, n = random.Random(len(text)), [], len(ids)
        while n:
            chunks.append(rng.randint(1, min(n, 4)))
            n -= chunks[-1]
    out, pieces = feed(tokenizer, text, stop, chunks)
    expected = expected_cut(text, stop)
    assert out.stopped
    assert out.text == expected
    streamed = ""
    for piece in pieces:
        streamed += piece
        # Whatever was shown is part of the final text; nothing of a stop string leaks out.
        assert expected.startswith(streamed)
    assert streamed == expected
    for s in stop:
        assert s not in streamed


def test_finish_after_stop_releases_nothing(tokenizer):
    out, pieces = feed(tokenizer, "The quick brown fox jumps over the lazy dog", [" fox"])
    assert out.stopped and out.text == "The quick brown"
    assert out.finish() == ""
    assert out.text == "The quick brown"


def test_add_after_stop_releases_nothing(tokenizer):
    out, pieces = feed(tokenizer, "The quick brown fox", [" fox"])
    assert out.stopped
    assert out.add(tokenizer.encode(" jumps")) == ""
    assert out.text == "The quick brown"


def test_holdback_of_partial_prefix_released_at_finish(tokenizer):
    out, pieces = feed(tokenizer, "Hello wor", [" world"])
    assert not out.stopped
    assert "".join(pieces) == "Hello"  # " wor" could still become " world"
    assert out.finish() == " wor"
    assert out.text == "Hello wor"
    assert not out.stopped


def test_holdback_uses_longest_matching_prefix(tokenizer):
    out, pieces = feed(tokenizer, "xx abc", ["abcd", "c!"])
    assert "".join(pieces) == "xx "  # "abc" is a prefix of "abcd" (longer than "c" of "c!")
    assert out.finish() == "abc"


def test_holdback_released_once_the_prefix_diverges(tokenizer):
    out, pieces = feed(tokenizer, "Hello word and more", [" world"])
    assert not out.stopped
    streamed = "".join(pieces) + out.finish()
    assert streamed == out.text == "Hello word and more"


def test_no_stop_strings_release_everything_immediately(tokenizer):
    text = "Hello wor 😀"
    ids = tokenizer.encode(text)
    out = TextOutput(tokenizer, [])
    streamed = ""
    for i in ids:
        streamed += out.add([i])
        # Without stop strings only incomplete characters are ever held back.
        assert "\ufffd" not in streamed
    assert streamed == text
    assert out.finish() == ""
    assert not out.stopped


@pytest.mark.parametrize("text,stop", [("The quick brown fox", ["cat"]), ("abcab", ["abd"]), ("Hi 😀", ["😀!"])])
def test_no_stop_occurring_streams_full_text(tokenizer, text, stop):
    out, pieces = feed(tokenizer, text, stop)
    assert not out.stopped
    streamed = "".join(pieces) + out.finish()
    assert streamed == out.text == text


def test_stop_string_spanning_token_boundary(tokenizer):
    text = "The quick brown fox"
    ids = tokenizer.encode(text)
    boundaries = [len(tokenizer.decode(ids[:k])) for k in range(1, len(ids))]
    b = boundaries[1]  # end of the second token
    stop = text[b - 2 : b + 2]
    assert tokenizer.decode(ids[:2]).endswith(stop[:2])  # the stop string straddles tokens 2 and 3
    out, pieces = feed(tokenizer, text, [stop])
    assert out.stopped
    assert out.text == text[: b - 2]
    assert "".join(pieces) == text[: b - 2]
