"""Continuous batching: many requests decode together, one batched forward per step.

    step:  admit waiting requests (up to max_batch running)
           prefill chunks, within the step's token budget (SARATHI's chunked prefill), so that
               running streams keep flowing while a long prompt is read
           every decoding sequence plans its root + draft tree, cut against the whole batch
           logits = model.forward_batch(all segments)       (each attends to its own cache)
           each sequence completes its step with its own rows; finished ones leave at once

The forward is batch-invariant (models/llama.py), so each request's output is exactly what it
would be alone. Drafts are sized on this machine's cost curve against the batch's rows and
expected tokens (runtime/draft_size.py): they shrink as the batch grows and grow back as it empties.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .drafters.base import Drafter
from .runtime.sampling import SamplingParams
from .sequence import PREFILL_CHUNK, GenerationResult, Sequence


@dataclass
class Request:
    sequence: Sequence
    on_text: Callable[[str], None] = lambda text: None  # each newly safe piece of text, in order
    result: GenerationResult | None = None
    pieces: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, engine, max_batch: int = 8, step_tokens: int = PREFILL_CHUNK):
        """max_batch: sequences decoding at once; step_tokens: prompt tokens one step may prefill."""
        self.engine, self.max_batch, self.step_tokens = engine, max_batch, step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def submit(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter,
               on_text: Callable[[str], None] | None = None) -> Request:
        """Queue a request. `drafter` must be its own: a drafter holds one request's state at a time."""
        self.engine.check_prompt(prompt_ids)
        request = Request(Sequence(self.engine, list(prompt_ids), params, drafter))
        if on_text is not None:
            request.on_text = on_text
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Drop a request (a client went away): its cache is freed with it."""
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self) -> list[Request]:
        """One batched forward; returns the requests that finished in it."""
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
        budget = self.step_tokens
        planned, rows, expected = [], 0, 0.0
        for r in self.running:  # prompts first, so the drafts below are sized against their rows
            if r.sequence.prefilling and budget > 0:
                segment = r.sequence.plan(prefill_tokens=budget)
                budget -= len(segment.tokens)
                planned.append((r, segment))
                rows += len(segment.tokens)
        for r in self.running:
            if not r.sequence.prefilling:
                segment = r.sequence.plan(other_rows=rows, other_tokens=expected)
                planned.append((r, segment))
                rows += len(segment.tokens)
                expected += r.sequence.expected_tokens
        if not planned:
            return []
        logits = self.engine.model.forward_batch([segment for _, segment in planned])
        finished, row = [], 0
        for r, segment in planned:
            n = 1 if segment.last_only else len(segment.tokens)
            text = r.sequence.complete(logits[row : row + n])
            row += n
            if text:
                r.pieces.append(text)
                r.on_text(text)
            if r.sequence.done:
                last, r.result = r.sequence.close()
                if last:
                    r.pieces.append(last)
                    r.on_text(last)
                self.running.remove(r)
                finished.append(r)
        return finished

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while not self.idle:
            self.step()
