"""OpenAI's response shapes for what a request produced: logprobs (chat and completions), usage, and
fastdecode's own statistics and token provenance."""
from __future__ import annotations

from functools import lru_cache

from ..drafters import METHODS


class TokenFormat:
    """Tokens as OpenAI shows them: each decoded alone, with its own bytes (a piece of a UTF-8
    character stays a piece, so a client can join the bytes of several tokens)."""

    def __init__(self, tokenizer):
        self.text = lru_cache(maxsize=65536)(lambda token: tokenizer.decode([token]))
        self.bytes = lru_cache(maxsize=65536)(tokenizer.token_bytes)

    def label(self, token: int) -> str:
        """The token's `token` string in logprobs: its bytes, invalid UTF-8 replaced."""
        return self.bytes(token).decode("utf-8", errors="replace")

    def entries(self, tokens) -> list[dict]:
        """Token provenance (`show_tokens`): id, text and who proposed it."""
        return [{"id": t.id, "text": self.text(t.id), "source": t.source} for t in tokens]

    def chat_logprobs(self, tokens) -> list[dict]:
        def one(token: int, logprob: float) -> dict:
            return {"token": self.label(token), "logprob": logprob, "bytes": list(self.bytes(token))}
        return [{**one(t.id, t.logprob), "top_logprobs": [one(i, lp) for i, lp in t.top]} for t in tokens]

    def completion_logprobs(self, tokens, offset: int = 0) -> tuple[dict, int]:
        """The legacy shape, with each token's offset in the text from `offset`; and the offset after them."""
        texts = [self.label(t.id) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{self.label(i): lp for i, lp in t.top} for t in tokens], "text_offset": offsets}, offset


def usage(results: list) -> dict:
    prompt = results[0].num_prompt_tokens
    completion = sum(r.num_generated_tokens for r in results)
    # n > 1: the prompt is read once (the first choice), its siblings adopt its blocks.
    cached = results[0].stats.cached_prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def statistics(results: list, method: str) -> dict:
    drafts = sum(r.stats.drafts for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    # "lossless": false marks a method whose output may differ from plain decoding (lud-confidence)
    return {"method": method, "lossless": METHODS[method].lossless, "drafts": drafts, "draft_tokens": sum(r.stats.draft_tokens for r in results),
            "accepted_tokens": accepted, "mean_acceptance_length": round(1.0 + accepted / drafts if drafts else 1.0, 4),
            "forward_passes": sum(r.stats.forward_passes for r in results)}
