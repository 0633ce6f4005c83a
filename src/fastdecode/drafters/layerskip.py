"""`layerskip`: self-speculation. The target drafts for itself with part of its layers; no extra weights.

Each draft token runs through the target's layers minus a skipped set, writing its keys and values
into the target's own KV cache beyond the committed rows (the verify forward overwrites them, so
the cache is shared and nothing is copied). Three ideas from the literature, sized for a CPU:
  * SWIFT (Xia et al. 2024): the skipped set is chosen on the fly. Every `trial_steps` decode
    steps a neighbouring set (one middle layer more or fewer skipped) is tried and kept if it
    produced more tokens per second of wall time; the best set persists across requests.
  * Kangaroo / DEL: drafting stops early once the draft's confidence in a token drops below
    `min_confidence`, where more drafting would mostly be wasted.
  * FR-Spec (Zhao et al. 2025): the draft's output head covers only the `draft_vocab` most
    frequent tokens (the lowest ids of a BPE vocabulary) plus every token of the prompt, so the
    head, a fifth of this small model's weights, costs a fraction when drafting.
Under sampling each token is drawn from the draft distribution q and q goes to the verifier, which
keeps the output exactly distributed as plain sampling.
"""
from __future__ import annotations

import random
import time

import torch

from ..runtime.sampling import is_int, is_number, target_probabilities
from ..runtime.tree import DraftTree
from .base import DecodeState, StepResult, check_options

KEEP_EDGE = 2  # the first and last layers are never skipped: drafts without them are useless


class LayerSkip:
    name = "layerskip"
    summary = "self-speculation with a subset of the model's own layers (no extra weights)"
    lossless = True

    def __init__(self, max_depth: int = 6, min_confidence: float = 0.5, skip: float = 0.4,
                 draft_vocab: int = 8192, trial_steps: int = 12, adapt: bool = True):
        check_options("layerskip", [
            (lambda: is_int(max_depth) and max_depth >= 1, "max_depth must be an integer >= 1"),
            (lambda: is_number(min_confidence) and 0 <= min_confidence < 1, "min_confidence must be in [0, 1)"),
            (lambda: is_number(skip) and 0 < skip < 1, "skip (the fraction of middle layers skipped at first) must be in (0, 1)"),
            (lambda: is_int(draft_vocab) and draft_vocab >= 1, "draft_vocab must be an integer >= 1"),
            (lambda: is_int(trial_steps) and trial_steps >= 1, "trial_steps must be an integer >= 1"),
        ])
        self.max_depth, self.min_confidence, self.skip = max_depth, min_confidence, skip
        self.draft_vocab, self.trial_steps, self.adapt = draft_vocab, trial_steps, adapt
        self.best: frozenset[int] | None = None  # skipped layers, kept across requests
        self.best_rate = 0.0
        self.current: frozenset[int] | None = None
        self.random = random.Random(0)
        self._tokens, self._seconds, self._steps = 0, 0.0, 0

    def begin(self, prompt_ids: list[int]) -> None:
        self.prompt_ids = prompt_ids
        self.head = None  # built at the first step, when the model is known
        self.generator = None
        self.step_start = None

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        self.step_start = time.perf_counter()
        model, cache, params = state.model, state.cache, state.params
        num_layers = self.num_layers = model.config.num_layers
        if self.best is None:  # start from evenly spread middle layers
            middle = list(range(KEEP_EDGE, num_layers - KEEP_EDGE))
            count = round(self.skip * len(middle))
            self.best = self.current = frozenset(middle[i * len(middle) // count] for i in range(count))
        if self.head is None:
            vocab = model.config.vocab_size
            self.ids = torch.unique(torch.cat([torch.arange(min(self.draft_vocab, vocab)), torch.tensor(self.prompt_ids)]))
            self.head = model.partial_head(self.ids)
            if not params.greedy:
                self.generator = torch.Generator().manual_seed((params.seed or 0) + 1)
        layers = [i for i in range(num_layers) if i not in self.current]

        start, token, score = cache.length, state.tokens[-1], 1.0
        tokens, scores, probs = [], [], []
        for depth in range(min(budget, self.max_depth)):
            logits = model.forward(torch.tensor([token]), torch.tensor([start + depth]), cache, layers=layers, head=self.head)
            cache.commit(1)
            if params.greedy:
                p = torch.softmax(logits[0], -1)
                j = int(p.argmax())
            else:
                p = target_probabilities(logits, params)[0]
                j = int(torch.multinomial(p, 1, generator=self.generator))
                probs.append(torch.zeros(model.config.vocab_size).index_copy_(0, self.ids, p))
            token, confidence = int(self.ids[j]), float(p[j])
            score *= confidence
            tokens.append(token)
            scores.append(score)
            if confidence < self.min_confidence:
                break
        cache.rollback(start)
        tree = DraftTree.chain(tokens)
        tree.scores = scores
        tree.draft_probs = torch.stack(probs) if probs else None
        return tree

    def observe(self, result: StepResult) -> None:
        if not self.adapt or self.step_start is None:  # no proposal this step (no room left)
            return
        self._tokens += len(result.new_tokens)
        self._seconds += time.perf_counter() - self.step_start
        self._steps += 1
        self.step_start = None
        if self._steps < self.trial_steps:
            return
        rate = self._tokens / self._seconds
        self._tokens, self._seconds, self._steps = 0, 0.0, 0
        if self.current == self.best:
            self.best_rate = rate if self.best_rate == 0 else 0.5 * (self.best_rate + rate)
        elif rate > self.best_rate:
            self.best, self.best_rate = self.current, rate
        self.current = self._neighbour(self.best)

    def _neighbour(self, skipped: frozenset[int]) -> frozenset[int]:
        """The same set with one middle layer more or fewer skipped (SWIFT's local search)."""
        middle = range(KEEP_EDGE, self.num_layers - KEEP_EDGE)
        return skipped ^ {self.random.choice(middle)} if middle else skipped
