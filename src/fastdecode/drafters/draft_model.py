"""`draft`: classic speculative decoding with a separate, smaller draft model.

A small model sharing the target's tokenizer proposes a chain of k tokens, one cheap forward each;
the target checks all of them in one forward. Greedy: the draft's argmax tokens, accepted while
they match the target's argmax. Sampling: each token is sampled from the draft distribution q
(after the request's temperature / top-k / top-p / min-p) and handed to the verifier with q, which
accepts it with probability min(1, p/q) and otherwise resamples from the residual, so the output is
distributed exactly as the target's (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", arXiv:2211.17192; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling", arXiv:2302.01318).

The draft keeps its own KV cache. It remembers which tokens its rows hold; each step it rolls back
to the longest prefix still matching the context (rows of accepted draft tokens stay valid), feeds
the rest (at least the root) in one forward, then drafts token by token. Drafting stops early once
the chain's estimated acceptance probability falls below min_confidence.

Scores: the draft's probability of each chosen token, times a correction factor learned per
probability bin (accepted / predicted, running counts kept across requests), multiplied along the
chain: how confident the draft is, calibrated by how often the target has agreed at that confidence.
"""
from __future__ import annotations

import hashlib
import os

import torch

from ..errors import FastDecodeError
from ..models.loader import load
from ..runtime.kv_cache import KVCache
from ..runtime.sampling import is_int, is_number, target_probabilities
from ..runtime.tree import DraftTree
from .acceptance import Calibration
from .base import DecodeState, StepResult, Target, check_options

PREFILL_CHUNK = 512  # as in sequence.py (not imported: that module imports the drafters): bounds attention memory
HEADROOM = 256  # cache rows allocated to begin with; the pool doubles when they run out


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (slice comparisons run in C: cheap for long contexts)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def vocabulary_difference(target_tok, draft_tok) -> str | None:
    """Why two tokenizers are not interchangeable, or None when they are."""
    # The `tokenizers` object behind our Tokenizer holds the token -> id map.
    a = target_tok._tok.get_vocab(with_added_tokens=True)
    b = draft_tok._tok.get_vocab(with_added_tokens=True)
    if a != b:
        differ = sorted(t for t in a.keys() | b.keys() if a.get(t) != b.get(t))
        shown = ", ".join(f"{t!r}: {a.get(t)} vs {b.get(t)}" for t in differ[:3])
        return f"the vocabularies differ ({len(a)} vs {len(b)} tokens; {len(differ)} tokens differ, e.g. {shown})"
    if target_tok.eos_ids != draft_tok.eos_ids:
        return f"the end-of-sequence ids differ ({sorted(target_tok.eos_ids)} vs {sorted(draft_tok.eos_ids)})"
    return None


class DraftModel:
    name = "draft"
    summary = "a separate draft model with the same tokenizer (--draft-model)"
    lossless = True
    needs_target = True

    def __init__(self, target: Target, draft_model: str | None = None, max_depth: int = 8,
                 min_confidence: float = 0.3):
        if draft_model is None:
            raise FastDecodeError(
                "method 'draft' needs the option draft_model: a registered model name, a .gguf file "
                "or a Hugging Face checkpoint folder of a smaller model with the target's tokenizer"
            )
        check_options("draft", [
            (lambda: is_int(max_depth) and max_depth >= 1, "max_depth must be an integer >= 1"),
            (lambda: is_number(min_confidence) and 0 <= min_confidence < 1, "min_confidence must be a number in [0, 1)"),
        ])
        loaded = load(draft_model, target.model.dtype)
        self.model = loaded.model
        width, target_width = self.model.lm_head.out_features, target.model.lm_head.out_features  # logits widths
        if width != target_width:
            raise FastDecodeError(
                f"draft model {loaded.name!r} predicts {width} token ids but target model {target.name!r} "
                f"predicts {target_width}: a draft model must share the target's tokenizer"
            )
        difference = vocabulary_difference(target.tokenizer, loaded.tokenizer)
        if difference:
            raise FastDecodeError(
                f"draft model {loaded.name!r} does not share the tokenizer of target model {target.name!r}: {difference}"
            )
        self.draft_name = loaded.name
        self.eos_ids = target.tokenizer.eos_ids
        self.max_depth, self.min_confidence = max_depth, min_confidence
        # Kept across requests: the calibration, and the cache (a new prompt reuses a shared prefix).
        self.calibration = Calibration()
        self.cache = KVCache(self.model.new_pool(rows=HEADROOM), self.model.config.max_position_embeddings)
        self.cached: list[int] = []  # the tokens whose rows are cache rows [0, len)
        self.begin([])

    def begin(self, prompt_ids: list[int]) -> None:
        self.generator: torch.Generator | None = None  # seeded on the first sampled proposal
        self.proposed: list[int] = []
        self.confidences: list[float] = []  # q of each proposed token
        self.greedy = True

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        self.proposed, self.confidences = [], []
        tokens, params = state.tokens, state.params
        # Draft rows take positions len(tokens) - 1 (root) .. len(tokens) + depth - 2.
        depth = min(self.max_depth, budget, self.model.config.max_position_embeddings - len(tokens) + 1)
        if depth <= 0:
            return DraftTree()
        self.greedy = params.greedy
        logits = self._catch_up(tokens, depth)
        drafted, probs, scores = [], [], []
        score = 1.0
        while True:
            if params.greedy:
                token = int(logits.argmax())
                q_token = float(torch.softmax(logits, -1)[token])
            else:
                q = target_probabilities(logits[None], params)[0]
                token = int(torch.multinomial(q, 1, generator=self._generator(params.seed)))
                q_token = float(q[token])
                probs.append(q)
            score *= self.calibration.rate(params.greedy, q_token)
            drafted.append(token)
            scores.append(score)
            self.confidences.append(q_token)
            # Nothing after an end-of-sequence token is ever accepted.
            done = token in self.eos_ids and not params.ignore_eos
            if done or len(drafted) == depth or score < self.min_confidence:
                break
            logits = self._forward([token])
        self.proposed = drafted
        tree = DraftTree.chain(drafted)
        tree.scores = scores
        if probs:
            tree.draft_probs = torch.stack(probs).float()
        return tree

    def observe(self, result: StepResult) -> None:
        if result.tree.tokens != self.proposed:
            return  # not this drafter's last proposal
        taken = set(result.accepted)
        for node in result.tried():
            self.calibration.record(self.greedy, self.confidences[node], node in taken)

    def _catch_up(self, tokens: list[int], depth: int) -> torch.Tensor:
        """Sync the cache with `tokens` and return the draft's logits [vocab] after the root."""
        # Keep the rows of the longest matching prefix, but always re-feed the root for its logits.
        keep = min(common_prefix(self.cached, tokens), len(tokens) - 1)
        self.cache.rollback(keep)
        del self.cached[keep:]
        for begin in range(keep, len(tokens), PREFILL_CHUNK):
            logits = self._forward(tokens[begin : begin + PREFILL_CHUNK])
        return logits

    def _forward(self, new: list[int]) -> torch.Tensor:
        """Append `new` to the cache; the logits [vocab] after its last token."""
        start = self.cache.length
        logits = self.model.forward(
            torch.tensor(new), torch.arange(start, start + len(new)), self.cache, last_logits_only=True
        )
        self.cache.commit(len(new))
        self.cached.extend(new)
        return logits[0]

    def _generator(self, seed: int | None) -> torch.Generator:
        """The drafter's own random stream: reproducible for a seeded request, and derived from the
        seed rather than equal to it, so it is independent of the verifier's stream."""
        if self.generator is None:
            if seed is None:
                derived = int.from_bytes(os.urandom(8), "little") % 2**63
            else:
                derived = int.from_bytes(hashlib.sha256(f"draft:{seed}".encode()).digest()[:8], "little") % 2**63
            self.generator = torch.Generator().manual_seed(derived)
        return self.generator
