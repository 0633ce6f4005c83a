"""One request's decoding as steps: plan() the rows of its next forward, complete() with their logits.

    prefill: chunks of the prompt (last row's logits only) fill the KV cache; the last chunk's
             logits give the first token
    decode:  tree   = drafter.propose(state, budget)         (empty for plain decoding)
             tree   = tree.subtree(best_nodes(tree, cost curve))   (the size that pays on this machine)
             rows   = [root] + tree nodes, depth-based positions, tree mask
                      (+ the drafter's placeholder rows, which no tree row sees: drafters/lud.py)
             ... the forward runs, alone or batched with other sequences (models/decoder.forward_batch) ...
             path, bonus = verify(tree, logits)              (greedy, or exact rejection sampling)
             cache.keep(root + accepted rows); emit accepted tokens + bonus; drafter.observe(...)

Each emitted token comes with a TokenInfo: who proposed it (a drafter, or the verifier itself for the
bonus token) and, when asked, its log-probability under the model, read off the verify row that
predicted it. The forward is batch-invariant, so that row, and the log-probability, are bitwise the
same under every method as under plain decoding.

The root is the last committed token: its KV row is written by the verify forward that follows it.
Splitting a step at the forward lets one loop serve one request (engine.py) or many at once.

Under a KV budget shared with other sequences (scheduler.py) a draft is cut to the rows the pool
can still give, and a sequence may be preempted: its blocks go back to the pool, and when it
resumes it prefills everything it had committed again. The forward is batch-invariant, so those
rows come out bitwise as before and the output does not change.

With prefix caching (prefix_cache=True, as the scheduler asks), a sequence publishes its KV blocks
as committed rows fill them, after prefill chunks and decode steps alike (so a chat's next turn
finds the previous answer's blocks too), and before its first prompt chunk, on starting or on
resuming, it adopts the pool's cached blocks holding the longest prefix of what it is to prefill
(runtime/prefix_cache.py). At least one token is always prefilled: its logits give the first token.
The adopted rows are bitwise those its prefill would write, so the output does not change either.
Where the kernels compute a prompt's rows on another path than generated ones (AMX tiles for
prompts only with FASTDECODE_AMX=prompts, kernels/matmul.c), only prompt rows are shared: a
generated row would not be bitwise the row that a later request computes for it as part of its
own prompt.
A sequence whose drafter reads the target's hidden states (`capture`: eagle, medusa, hydra) never
adopts: its drafter needs `prefilled(...)` with the states of every prompt row. It still publishes.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from .drafters.base import DecodeState, Drafter, StepResult
from .errors import FastDecodeError
from .metrics import RequestStats
from .models.segment import Segment
from .runtime.draft_size import best_nodes
from .runtime.grammar import Grammar
from .runtime.kv_cache import KVCache, KVPool, KVPoolFull
from .runtime.penalties import Penalties, has_adjustments
from .runtime.sampling import SamplingParams, next_tokens
from .runtime.tree import DraftTree
from .runtime.verify import verify_greedy, verify_sampling
from .served import ServedModel
from .stop_strings import TextOutput

PREFILL_CHUNK = 512  # prompt tokens per forward, at most: bounds attention memory for long prompts
MAX_DRAFT = 64  # tree nodes per step, at most (cache headroom)


@dataclass
class TokenInfo:
    id: int
    source: str  # "target": the verifier's own token; else the drafter that proposed it (auto: its member)
    logprob: float | None = None  # log-softmax of the model's raw logits (before penalties and temperature)
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely (id, logprob), best first

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "logprob": self.logprob, "top": self.top}


def token_info(token: int, source: str, logits: torch.Tensor, top: int | None) -> TokenInfo:
    """logits: the raw row [vocab] that predicted `token`; top: alternatives wanted (None: no logprobs)."""
    if top is None:
        return TokenInfo(token, source)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # one row at a time: the same shape under every method
    best = logprobs.topk(top)
    alternatives = list(zip(best.indices.tolist(), best.values.tolist()))
    return TokenInfo(token, source, float(logprobs[token]), alternatives)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_new_tokens or context window)
    method: str
    model: str
    stats: RequestStats = field(repr=False)
    tokens: list[TokenInfo] = field(default_factory=list, repr=False)  # one per token_ids entry

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
            "finish_reason": self.finish_reason,
            "method": self.method,
            "model": self.model,
            "stats": self.stats.to_dict(),
        }


def _verify_layout(tree: DraftTree, hangs: list[int], m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position offsets from the root's, and the attention mask (None: causal), of the verify rows:
    the root, the tree, then a chain of m placeholder rows after each hang node (-1: the root).
    Placeholder j of a chain sits j past its node and sees what the node sees, the node itself and
    placeholders 0..j of its chain; no tree row sees a placeholder."""
    depths = [0] + tree.depths()
    offsets = torch.tensor(depths + [depths[node + 1] + j for node in hangs for j in range(1, m + 1)])
    if not hangs:
        return offsets, tree.attention_mask() if len(tree) else None
    tree_mask = tree.attention_mask()
    n, total = len(tree_mask), len(offsets)
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:n, :n] = tree_mask
    for c, node in enumerate(hangs):
        rows = slice(n + c * m, n + (c + 1) * m)
        mask[rows, :n] = tree_mask[node + 1]
        mask[rows, rows] = torch.ones(m, m, dtype=torch.bool).tril()
    return offsets, mask


class Sequence:
    def __init__(self, served: ServedModel, prompt: list[int], params: SamplingParams, drafter: Drafter, pool: KVPool | None = None,
                 prefix_cache: bool = False):
        """served: the model this request runs on;
        pool: the KV pool shared with other sequences, or None for one of its own; prefix_cache:
        share blocks with the pool's other sequences (see above; pointless in a pool of its own)."""
        self.start = time.perf_counter()
        self.served, self.prompt, self.params, self.drafter = served, prompt, params, drafter
        self.max_new = min(params.max_new_tokens, served.context_window - len(prompt))
        capacity = len(prompt) + self.max_new + MAX_DRAFT + 1
        self.cache = KVCache(pool or served.model.new_pool(rows=capacity), capacity)
        self._prefix = prompt  # the tokens to prefill before decoding (all committed ones, on resuming)
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little"))
        self.stats = RequestStats(num_prompt_tokens=len(prompt))
        self.out = TextOutput(served.tokenizer, params.stop)
        self.eos_ids = frozenset() if params.ignore_eos else served.tokenizer.eos_ids
        self.generated: list[int] = []
        self.tokens: list[TokenInfo] = []  # one per generated token
        self.new_tokens: list[TokenInfo] = []  # those the last step added
        self.penalties = None
        if has_adjustments(params):
            self.penalties = Penalties(params, prompt, served.model.config.vocab_size)
        self.grammar = None
        if params.constraint is not None:
            self.grammar = Grammar(params.constraint, served.tokenizer, served.model.config.vocab_size)
        self.finish: str | None = None
        self.state: DecodeState | None = None  # set once the prompt is in the cache
        self._planned: DraftTree | int | None = None  # the tree of the planned step, or its prefill chunk length
        self._proposal: DraftTree | None = None  # the drafter's tree, of which _planned holds nodes _kept
        self._kept: list[int] = []
        self._hangs: list[int] = []  # the planned tree's nodes after which placeholder rows hang (-1: the root)
        self._segment: Segment | None = None  # the planned rows; the forward leaves captured states in it
        self.capture = tuple(getattr(drafter, "hidden_layers", ()))
        self.expected_tokens = 0.0  # new tokens the planned step should yield, on its drafter's scores
        self.prefix_cache = prefix_cache
        self._share_generated = not served.model.prompt_rows_differ  # generated rows' KV may be shared too
        self._looked_up = False  # whether this prefill has adopted cached blocks yet (once per start or resume)
        self.preempted = False
        drafter.begin(prompt)

    @property
    def done(self) -> bool:
        return self.finish is not None or self.out.stopped

    @property
    def prefilling(self) -> bool:
        return self.cache.length < len(self._prefix)

    @property
    def prefill_left(self) -> int:
        return len(self._prefix) - self.cache.length

    @property
    def rows_to_resume(self) -> int:
        """Cache rows the next step needs at least: the whole prefix to prefill, and a root."""
        return len(self._prefix) + 1

    def preempt(self) -> None:
        """Give the cache back to the pool; the sequence resumes by prefilling what it had committed."""
        if self.state is not None:
            self._prefix = self.state.tokens[:-1]  # the root's row is written by its next step
        self.cache.release()
        self._looked_up, self.preempted = False, True

    def reuse_prefix(self) -> None:
        """Before the first prompt chunk: adopt the cached blocks of the longest prefix of what is to
        be prefilled, leaving at least one token to prefill. Called by plan(); the scheduler calls it
        first to see the room the chunk will have. A new request looks up when its first chunk is
        planned, not when it arrives, so that of n requests with one prompt submitted together, the
        2nd..nth, which the scheduler lets read only after the first (fewest tokens left first),
        find its blocks. A preempted one looks up as soon as it is admitted again (scheduler.py),
        before other prompts read in the meantime evict its own blocks."""
        if self._looked_up or not self.prefilling:
            return
        self._looked_up = True
        if self.prefix_cache and not self.capture and self.cache.length == 0:
            adopted = self.cache.adopt(self._shareable(self._prefix), len(self._prefix) - 1)
            if self.state is None:  # the request's own start, not a resume after preemption
                self.stats.cached_prompt_tokens = adopted

    def plan(self, prefill_tokens: int = PREFILL_CHUNK, other_rows: int = 0, other_tokens: float = 0.0) -> Segment:
        """The rows of this sequence's next forward: at most `prefill_tokens` of them while
        prefilling; else the root and the part of the draft tree that pays, given the rows and
        expected tokens of the other sequences sharing the forward. Sets `expected_tokens`. The
        rows are reserved in the pool at once (KVPoolFull when it cannot give even one)."""
        self.reuse_prefix()
        free = self.cache.room()
        holders = getattr(self.drafter, "placeholders", None)
        if self.prefilling:
            begin = self.cache.length
            chunk = self._prefix[begin : begin + min(prefill_tokens, free)]
            if not chunk:
                raise KVPoolFull("no room in the KV pool for a prompt chunk")
            if holders is not None and (begin + len(chunk) < len(self._prefix) or free < len(chunk) + len(holders)):
                holders = None  # only after the last chunk: its guesses are the first step's draft
            n = len(chunk) + (0 if holders is None else len(holders))  # causal: placeholders see the whole chunk
            self.cache.reserve(begin + n)
            self._planned, self.expected_tokens = len(chunk), 0.0
            self._segment = Segment(torch.tensor(chunk + [0] * (n - len(chunk))), torch.arange(begin, begin + n), self.cache,
                                    last_only=True, capture=self.capture,
                                    prompt_rows=max(0, min(len(chunk), len(self.prompt) - begin)), placeholders=holders)
            return self._segment
        if holders is not None and free < 1 + len(holders):
            holders = None  # no room for them this step: the drafter gets no guesses from it
        m = 0 if holders is None else len(holders)
        room = min(self.max_new - len(self.generated), MAX_DRAFT + 1, free - m) - 1
        tree = self._drafted_tree(room, other_rows, other_tokens, m)
        self._hangs = [] if holders is None else (tree.hangs or [-1])[: max(1, (free - 1 - len(tree)) // m)]
        m_all = m * len(self._hangs)
        self.cache.reserve(self.cache.length + 1 + len(tree) + m_all)
        self.expected_tokens = 1.0 + sum(min(max(s, 0.0), 1.0) for s in tree.scores or [])
        self._planned = tree
        offsets, mask = _verify_layout(tree, self._hangs, m)
        if holders is not None and len(self._hangs) > 1:
            holders = holders.repeat(len(self._hangs), 1, 1)
        self._segment = Segment(torch.tensor([self.state.tokens[-1]] + tree.tokens + [0] * m_all), self.cache.length + offsets,
                                self.cache, mask, capture=self.capture, placeholders=holders)
        return self._segment

    def _drafted_tree(self, room: int, other_rows: int, other_tokens: float, placeholders: int) -> DraftTree:
        """The drafter's proposal, less what a grammar forbids and with the tokens it forces, cut to
        the size that pays, counting the placeholder rows it hangs as a fixed cost. Sets _proposal
        (the drafter's tree) and _kept (for each planned node, the proposal's node it is, or -1 for
        a token only the grammar drafted)."""
        proposal = self.drafter.propose(self.state, room) if room > 0 else DraftTree()
        if len(proposal) > room:
            raise FastDecodeError(f"method {self.drafter.name!r} proposed {len(proposal)} nodes, over its budget of {room}")
        self._proposal = proposal
        candidates, origin = proposal, list(range(len(proposal)))
        if self.grammar is not None:
            origin = self.grammar.allowed_nodes(proposal) if len(proposal) else []
            if len(origin) < len(proposal):
                candidates = proposal.subtree(origin)
            if room > 0 and getattr(self.drafter, "speculates", True):  # not for ar, the baseline
                candidates, merged = self.grammar.with_forced(candidates, room, self.drafter.name)
                origin = [origin[i] if i >= 0 else -1 for i in merged]
        other_rows += placeholders * len(proposal.hangs or [-1])
        kept = best_nodes(candidates, self.served.cost_curve, other_rows, other_tokens)
        self._kept = [origin[i] for i in kept]
        return candidates if len(kept) == len(candidates) else candidates.subtree(kept)

    def _adjust(self, row: torch.Tensor, path: list[int]) -> torch.Tensor:
        """A verify row as plain decoding would sample it: penalties, then the grammar's mask."""
        if self.penalties:
            row = self.penalties.apply(row, path)
        if self.grammar:
            row = self.grammar.restrict(row, path)
        return row

    def complete(self, logits: torch.Tensor) -> str | None:
        """Take the logits of the planned rows; return the text now safe to show (None while the
        prompt is still being prefilled)."""
        self.new_tokens = []
        if isinstance(self._planned, int):
            return self._complete_prefill(logits)
        tree, cache, params = self._planned, self.cache, self.params
        adjust = self._adjust if self.penalties or self.grammar else None
        placeholder_logits = None
        if self._segment.placeholders is not None:  # per hang, by the proposal's node numbers
            chains = logits[len(tree) + 1 :].unflatten(0, (len(self._hangs), -1))
            placeholder_logits = {-1 if h < 0 else self._kept[h]: chain for h, chain in zip(self._hangs, chains)}
            logits = logits[: len(tree) + 1]
        if params.greedy:
            path, bonus = verify_greedy(tree, logits, self.eos_ids, adjust)
        else:
            path, bonus = verify_sampling(tree, logits, params, self.generator, self.eos_ids, adjust)
        cache.keep([0] + [node + 1 for node in path])
        new = [tree.tokens[node] for node in path] + [bonus]
        self.stats.record_step(len(tree), len(path))
        rows = [-1] * len(self._proposal)
        for row, node in enumerate(self._kept, start=1):
            if node >= 0:
                rows[node] = row
        accepted = []  # the drafter's nodes on the accepted path, up to a token only the grammar drafted
        for node in path:
            if self._kept[node] < 0:
                break
            accepted.append(self._kept[node])
        hidden = self._segment.hidden
        if hidden is not None:
            hidden = hidden[[0] + [node + 1 for node in path]]
        self.drafter.observe(StepResult(self._proposal, rows, accepted, new, logits, hidden, placeholder_logits))
        predicted_by = [0] + [node + 1 for node in path]  # the verify row of each new token
        sources = [self._source(tree, node) for node in path] + ["target"]
        kept = []
        for token, row, source in zip(new, predicted_by, sources):  # one at a time: nothing after EOS or max_new_tokens leaks out
            kept.append(token)
            self._emit(token, source, logits[row])
            if self.finish:
                break
        self.state.tokens.extend(kept)
        if self.prefix_cache and self._share_generated:  # else the prefill published every block to share
            cache.publish(self.state.tokens)
        return self.out.add(kept)

    def _shareable(self, tokens: list[int]) -> list[int]:
        """The part of `tokens` whose KV rows may be shared with other requests: all of it, or only
        the prompt's where prompt rows are computed on another path than generated ones (AMX)."""
        return tokens if self._share_generated else tokens[: len(self.prompt)]

    def _source(self, tree: DraftTree, node: int) -> str:
        return tree.sources[node] if tree.sources else self.drafter.name

    def _emit(self, token: int, source: str, logits: torch.Tensor) -> None:
        """Commit one generated token, predicted by the raw `logits` row."""
        self.generated.append(token)
        info = token_info(token, source, logits, self.params.logprobs)
        self.tokens.append(info)
        self.new_tokens.append(info)
        if self.penalties:
            self.penalties.commit([token])
        if self.grammar:
            self.grammar.commit([token])
        self.finish = self._finish_reason()

    def _complete_prefill(self, logits: torch.Tensor) -> str | None:
        if self.capture:
            self.drafter.prefilled(self.cache.length, self._segment.hidden[: self._planned])
        if self._segment.placeholders is not None:
            self.drafter.guessed(logits[1:])
        self.cache.commit(self._planned)
        if self.prefix_cache:
            self.cache.publish(self._shareable(self._prefix))
        self.stats.forward_passes += 1
        if self.prefilling or self.state is not None:  # more to read, or a preempted sequence caught up
            return None
        row = self._adjust(logits[0], [])
        self._emit(int(next_tokens(row[None], self.params, self.generator)[0]), "target", logits[0])
        self.stats.prefill_time_s = time.perf_counter() - self.start
        self.state = DecodeState(self.prompt + self.generated, len(self.prompt), self.params, self.served.model, self.cache)
        return self.out.add(self.generated)

    def _finish_reason(self) -> str | None:
        if self.generated[-1] in self.eos_ids:
            return "stop"
        if len(self.generated) >= self.max_new:
            return "length"
        return None

    def close(self) -> tuple[str, GenerationResult]:
        """The last text held back for stop strings, and the result; the cache goes back to its pool."""
        self.cache.release()
        last = self.out.finish()
        self.stats.num_generated_tokens = len(self.generated)
        self.stats.wall_time_s = time.perf_counter() - self.start
        result = GenerationResult(
            text=self.out.text,
            token_ids=self.generated,
            num_prompt_tokens=len(self.prompt),
            num_generated_tokens=len(self.generated),
            finish_reason="stop" if self.out.stopped else self.finish,
            method=self.drafter.name,
            model=self.served.name,
            stats=self.stats,
            tokens=self.tokens,
        )
        return last, result
