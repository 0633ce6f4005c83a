"""Text output of one request: incremental detokenization, stop strings, safe streaming.

A piece of text is released only once it can no longer turn out to be the start of a stop
string, so a streamed answer never shows a stop string (or half of one) that the final text cuts.
"""
from __future__ import annotations

from .tokenizer import IncrementalDetokenizer, Tokenizer


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.released = 0  # characters of the text already handed out
        self.stopped = False
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that is now safe to show. Sets `stopped` on a stop string."""
        self.detok.add(token_ids)
        return self._update(final=False)

    def finish(self) -> str:
        """The end of generation: release what was held back."""
        self.detok.flush()
        return self._update(final=True)

    def _update(self, final: bool) -> str:
        if self.stopped:  # the text was cut and fully released when the stop string appeared
            return ""
        text = self.detok.text
        if self.stop:
            # A stop string can only end inside the new text, so search from just before it.
            start = max(0, len(self.text) - max(map(len, self.stop)) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                text, self.stopped = text[: min(hits)], True
        if self.stopped:
            final = True
        self.text = text
        safe = len(text) if final else len(text) - self._held_back(text)
        piece = text[self.released : safe] if safe > self.released else ""
        self.released = max(self.released, safe)
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
