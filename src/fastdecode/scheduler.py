"""Continuous batching: many requests decode together, one batched forward per step.

    step:  admit waiting requests (up to max_batch running, while the KV pool has room for them)
           make room: every decoding sequence needs a root row; when the pool cannot give them
               all, the newest request is preempted (its blocks freed, re-prefilled later)
           one prompt chunk of at most step_tokens (SARATHI's chunked prefill), from the prompt
               with the fewest tokens left: running streams keep flowing while a long prompt is
               read, and a short request's first token waits for at most one of its chunks
           every decoding sequence plans its root + draft tree, cut against the batch's decode rows
           logits = model.forward_batch(all segments)       (each attends to its own cache)
           each sequence completes its step with its own rows; finished ones leave at once

The forward is batch-invariant (models/decoder.py), so each request's output is exactly what it
would be alone. Drafts are sized on this machine's cost curve against the batch's rows and
expected tokens (runtime/draft_size.py): they shrink as the batch grows and grow back as it empties.

KV memory is a pool of blocks under a byte budget (runtime/kv_cache.py), taken as sequences grow
and given back when they finish: memory follows the tokens held, not max_tokens. As in vLLM, a
request is admitted while its prompt fits, and preemption by recomputation keeps the oldest
requests moving when the pool runs short (exact, because the forward is batch-invariant).

Prefix caching (vLLM's automatic prefix caching; sequence.py, runtime/prefix_cache.py): full blocks
are published as sequences fill them and stay cached after they finish, until the pool needs the
room (LRU eviction). A request whose prompt starts with a cached prefix (a shared system prompt, a
chat's earlier turns and answers, n samples of one prompt) adopts those blocks before its first
chunk and prefills only the rest; a preempted one mostly finds its own blocks again. The pool's
room counts cached blocks as available: they are evicted when needed, never waited for.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .drafters.base import Drafter
from .errors import FastDecodeError
from .runtime.kv_cache import blocks_for
from .runtime.sampling import SamplingParams
from .sequence import GenerationResult, Sequence
from .served import ServedModel

STEP_TOKENS = 32  # prompt tokens per step: while a long prompt is read, others' steps take ~45 ms here
KV_BUDGET_MB = 512  # the server's KV pool by default: SmolLM2 needs 180 MiB for one full 8,192-token window


@dataclass
class Request:
    sequence: Sequence
    on_text: Callable[[str], None] = lambda text: None  # each newly safe piece of text, in order
    # The tokens each step committed (sequence.TokenInfo), called before that step's on_text: text
    # is held back near a possible stop string, so the two need not line up piece by piece.
    on_tokens: Callable[[list], None] = lambda tokens: None
    result: GenerationResult | None = None
    pieces: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, served: ServedModel, max_batch: int = 8, step_tokens: int = STEP_TOKENS, kv_budget_bytes: int | None = None,
                 prefix_cache: bool = True):
        """max_batch: sequences decoding at once; step_tokens: prompt tokens one step may prefill
        (a step's latency grows with them: about 1.2 ms a token on a 2-core Zen 4 in bfloat16);
        kv_budget_bytes: the KV pool's size (None: a pool that grows as needed; it caches prefixes
        too, in the room it has, and evicts them before it grows); prefix_cache: reuse the KV
        blocks of prompt prefixes seen before."""
        self.served, self.max_batch, self.step_tokens = served, max_batch, step_tokens
        self.prefix_cache = prefix_cache
        self.pool = served.model.new_pool(budget_bytes=kv_budget_bytes)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache, cumulative (on each start or resume; vLLM's
        prefix_cache_queries)."""
        return self.pool.prefix_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of those, the tokens whose KV rows were reused rather than prefilled (vLLM's prefix_cache_hits)."""
        return self.pool.prefix_hits

    def submit(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter,
               on_text: Callable[[str], None] | None = None, on_tokens: Callable[[list], None] | None = None) -> Request:
        """Queue a request. `drafter` must be its own: a drafter holds one request's state at a time."""
        self.served.check_prompt(prompt_ids)
        sequence = Sequence(self.served, list(prompt_ids), params, drafter, self.pool, self.prefix_cache)
        self.check_fits(len(prompt_ids), sequence.max_new)
        request = Request(sequence)
        if on_text is not None:
            request.on_text = on_text
        if on_tokens is not None:
            request.on_tokens = on_tokens
        self.waiting.append(request)
        return request

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a request the whole KV budget could not hold even alone (it could never finish)."""
        need = blocks_for(prompt_tokens + max_new_tokens + 1)
        if self.pool.fixed and need > self.pool.num_blocks:
            mib = lambda blocks: f"{self.pool.bytes_per_block * blocks / 2**20:.1f} MiB"  # noqa: E731
            raise FastDecodeError(f"the prompt ({prompt_tokens} tokens) and max_tokens ({max_new_tokens}) need "
                                  f"{mib(need)} of KV cache; the budget is {mib(self.pool.num_blocks)}")

    def cancel(self, request: Request) -> None:
        """Drop a request (a client went away): its cache is freed with it."""
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        request.sequence.cache.release()

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _admit(self) -> None:
        """Waiting requests join, oldest first, while slots are free and the pool holds their
        prompt, keeping a block in hand for each running sequence's next rows."""
        while self.waiting and len(self.running) < self.max_batch:
            need = blocks_for(self.waiting[0].sequence.rows_to_resume) + len(self.running)
            if self.pool.fixed and self.running and need > self.pool.available:
                return
            self.running.append(self.waiting.popleft())
            if self.running[-1].sequence.preempted:  # its own blocks, before others' prompts evict them
                self.running[-1].sequence.reuse_prefix()

    def _make_room(self) -> None:
        """Preempt the newest requests until every decoding sequence can get its root row."""
        while len(self.running) > 1:
            short = sum(1 for r in self.running if not r.sequence.prefilling and r.sequence.cache.spare_rows < 1)
            if short <= self.pool.available:
                return
            victim = self.running.pop()
            victim.sequence.preempt()
            self.waiting.appendleft(victim)
            self.preemptions += 1

    def step(self) -> list[Request]:
        """One batched forward; returns the requests that finished in it."""
        with self.served.stepping():
            return self._step()

    def _step(self) -> list[Request]:
        self._admit()
        if self.pool.fixed:
            self._make_room()
            for r in self.running:  # roots first, so that no draft or prompt takes their rows
                if not r.sequence.prefilling:
                    r.sequence.cache.reserve(r.sequence.cache.length + 1)
        planned, rows, expected = [], 0, 0.0
        reading = [r for r in self.running if r.sequence.prefilling and r.sequence.cache.room() > 0]
        if reading:
            r = min(reading, key=lambda r: r.sequence.prefill_left)
            r.sequence.reuse_prefix()  # adopting cached blocks takes them out of the pool's room
            if r.sequence.cache.room() > 0:
                planned.append((r, r.sequence.plan(prefill_tokens=self.step_tokens)))
        # Drafts are sized against the decoding rows only: a prompt chunk is work the batch does
        # anyway, and counted in the ratio it would make every draft row look cheap (measured:
        # speculation then lost 9% against plain decoding at 8 clients on Spec-Bench prompts).
        for r in self.running:
            if not r.sequence.prefilling:
                segment = r.sequence.plan(other_rows=rows, other_tokens=expected)
                planned.append((r, segment))
                rows += len(segment.tokens)
                expected += r.sequence.expected_tokens
        if not planned:
            return []
        logits = self.served.model.forward_batch([segment for _, segment in planned])
        finished, row = [], 0
        for r, segment in planned:
            n = 1 if segment.last_only else len(segment.tokens)
            text = r.sequence.complete(logits[row : row + n])
            row += n
            if r.sequence.new_tokens:
                r.on_tokens(r.sequence.new_tokens)
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
