"""LUD's training batches: the target's answers, its keys and values, and lexical units marked by its
own confidence (heads/lud.py says what is trained on them).

For each sequence (prompt and answer) one forward of the engine gives every row's keys and values
and the target's next-token distribution at every position. An anchor is a position n of the
answer where the chain would hang: placeholder j (1..k) sits at n + j and guesses token n + j + 1,
whose target is the stored distribution of row n + j. LUD's rule marks the units: the guess of
placeholder j counts in the loss only when tokens n + 2 .. n + j + 1 each had probability at least
`threshold` given the true text before them (token n + 1 is the verifier's own, never a guess).
Training anchors are drawn among those where placeholder 1 counts; held-out anchors among all
positions, every guess counted, so that the held-out acceptance is what decoding meets.

Keys and values are computed afresh for every batch (storing them would take tens of GB): the
engine's forward of 4,096 rows is most of a step's time.
"""
from __future__ import annotations

import random

import torch

TOP_K = 16  # entries of the target's distribution kept as each guess's soft target
ANCHORS = 32  # anchors drawn per sequence and batch


class LudData:
    """Sequences as the training loop reads them: `lengths` and `batch(items, layers)`."""

    layers: tuple[int, ...] = ()  # no stored states: each batch runs the target afresh

    def __init__(self, model, sequences: list[tuple[list[int], int]], k: int, threshold: float, seed: int,
                 units_only: bool, anchors: int = ANCHORS):
        """sequences: (prompt + answer token ids, prompt length); k placeholders per anchor."""
        self.model, self.sequences, self.k, self.threshold = model, sequences, k, threshold
        self.seed, self.units_only, self.anchors = seed, units_only, anchors
        self.lengths = [len(s) for s, _ in sequences]
        self.answer_tokens = sum(len(s) - p for s, p in sequences)

    @torch.no_grad()
    def _sequence(self, index: int):
        """(keys, values: per layer [T, kv, d], anchors [A], mask and valid [A, k], top ids and probs [A, k, K])."""
        tokens, prompt = self.sequences[index]
        T, k, model = len(tokens), self.k, self.model
        cache = model.new_cache(T)
        logits = model.forward(torch.tensor(tokens), torch.arange(T), cache).float()
        keys = [cache.keys(i, T).permute(2, 0, 1).clone() for i in range(model.config.num_layers)]
        values = [cache.values(i, T).permute(1, 0, 2).clone() for i in range(model.config.num_layers)]
        probs = torch.softmax(logits, -1)
        confident = torch.zeros(T, dtype=torch.bool)  # token t was predicted with p >= threshold
        confident[1:] = probs[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0] >= self.threshold
        top = probs.topk(TOP_K, -1)
        candidates = torch.arange(max(prompt - 1, 0), T - 2)
        guessed = candidates[:, None] + torch.arange(1, k + 1)[None] + 1  # the token each placeholder guesses
        valid = guessed <= T - 1
        guessed = guessed.clamp(max=T - 1)
        mask = valid & confident[guessed].cumprod(-1).bool() if self.units_only else valid
        pool = candidates[mask[:, 0]] if self.units_only else candidates
        rng = random.Random(f"{self.seed}:{index}")
        chosen = sorted(rng.sample(range(len(pool)), min(self.anchors, len(pool))))
        anchors = pool[chosen]
        rows = anchors - candidates[0] if len(candidates) else anchors
        at = (anchors[:, None] + torch.arange(1, k + 1)[None]).clamp(max=T - 1)  # the row holding each target
        return (keys, values, anchors, mask[rows], valid[rows], top.indices[at], top.values[at])

    def batch(self, items: list[int], layers=()) -> dict:
        parts = [self._sequence(i) for i in items]
        k = self.k
        n_context = sum(self.lengths[i] for i in items)
        n_rows = sum(len(p[2]) for p in parts) * k
        sees = torch.zeros(n_rows, n_context + n_rows, dtype=torch.bool)
        chain = torch.ones(k, k, dtype=torch.bool).tril()
        offset = row = 0
        spans = []  # per sequence: its placeholder rows, its context rows
        for i, (_, _, anchors, *_) in zip(items, parts):
            spans.append([row, row + len(anchors) * k, offset, offset + self.lengths[i]])
            for n in anchors.tolist():
                sees[row : row + k, offset : offset + n + 1] = True
                sees[row : row + k, n_context + row : n_context + row + k] = chain
                row += k
            offset += self.lengths[i]
        return {
            "keys": torch.stack([torch.cat([p[0][layer] for p in parts]) for layer in range(self.model.config.num_layers)]),
            "values": torch.stack([torch.cat([p[1][layer] for p in parts]) for layer in range(self.model.config.num_layers)]),
            "key_positions": torch.cat([torch.arange(self.lengths[i]) for i in items]),
            "anchors": torch.cat([p[2] for p in parts]), "sees": sees, "spans": torch.tensor(spans).view(-1, 4),
            "mask": torch.cat([p[3] for p in parts]), "valid": torch.cat([p[4] for p in parts]),
            "top_ids": torch.cat([p[5] for p in parts]), "top_probs": torch.cat([p[6] for p in parts]),
        }
