"""The decode loop: draft, verify in one forward pass, keep the accepted tokens.

    prompt ids -> prefill (chunks of PREFILL_CHUNK tokens fill the KV cache) -> first token
    loop until EOS / stop string / max_new_tokens / context window:
        tree   = drafter.propose(state, budget)              (empty for plain decoding)
        tree   = best_subtree(tree, cost curve)              (the size that pays on this machine)
        logits = model.forward([root] + tree nodes, depth-based positions, tree mask)
        path, bonus = verify(tree, logits)                   (greedy, or exact rejection sampling)
        cache.keep(root + accepted rows); emit accepted tokens + bonus; drafter.observe(...)

The root is the last committed token: its KV row is written by the verify forward that follows it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .drafters.base import DecodeState, Drafter, StepResult
from .errors import FastDecodeError
from .metrics import RequestStats
from .models.llama import LlamaModel
from .runtime.cost_curve import CostCurve, load_or_measure
from .runtime.draft_size import best_subtree
from .runtime.sampling import SamplingParams, next_tokens
from .runtime.tree import DraftTree
from .runtime.verify import verify_greedy, verify_sampling
from .stop_strings import TextOutput
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512  # bounds attention memory for long prompts
MAX_DRAFT = 64  # tree nodes per step, at most (cache headroom)


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


class Generation:
    """Iterate for text pieces as they are decoded; `result` is set once iteration ends."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._pieces

    def consume(self) -> GenerationResult:
        for _ in self:
            pass
        return self.result


class Engine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, model_name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_window = model.config.max_position_embeddings
        self._cost_curve: CostCurve | None = None

    @property
    def cost_curve(self) -> CostCurve:
        """This machine's forward-latency curve for the model (stored, or measured on first use)."""
        if self._cost_curve is None:
            self._cost_curve = load_or_measure(self.model, self.model_name)
        return self._cost_curve

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise FastDecodeError("the prompt is empty")
        if len(prompt_ids) >= self.context_window:
            raise FastDecodeError(
                f"the prompt has {len(prompt_ids)} tokens; the context window of {self.model_name} "
                f"is {self.context_window} tokens (prompt plus generated)"
            )

    def generate(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter) -> GenerationResult:
        return self.stream(prompt_ids, params, drafter).consume()

    def stream(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter) -> Generation:
        self.check_prompt(prompt_ids)
        return Generation(self._run(list(prompt_ids), params, drafter))

    def _run(self, prompt: list[int], params: SamplingParams, drafter: Drafter):
        start = time.perf_counter()
        model = self.model
        max_new = min(params.max_new_tokens, self.context_window - len(prompt))
        cache = model.new_cache(len(prompt) + max_new + MAX_DRAFT + 1)
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little"))
        stats = RequestStats(num_prompt_tokens=len(prompt))
        out = TextOutput(self.tokenizer, params.stop)
        eos_ids = frozenset() if params.ignore_eos else self.tokenizer.eos_ids
        drafter.begin(prompt)

        logits = self._prefill(prompt, cache, stats)
        generated = [int(next_tokens(logits, params, generator)[0])]
        stats.prefill_time_s = time.perf_counter() - start
        finish = self._finish_reason(generated, eos_ids, max_new)
        yield out.add(generated)
        state = DecodeState(prompt + generated, len(prompt), params, model, cache)
        while finish is None and not out.stopped:
            room = min(max_new - len(generated), MAX_DRAFT + 1) - 1
            tree = drafter.propose(state, room) if room > 0 else DraftTree()
            if len(tree) > room:
                raise FastDecodeError(f"method {drafter.name!r} proposed {len(tree)} nodes, over its budget of {room}")
            if tree.scores is not None:
                tree = best_subtree(tree, self.cost_curve)
            rows = [state.tokens[-1]] + tree.tokens
            positions = cache.length + torch.tensor([0] + tree.depths())
            mask = tree.attention_mask() if len(tree) else None
            logits = model.forward(torch.tensor(rows), positions, cache, mask)
            if params.greedy:
                path, bonus = verify_greedy(tree, logits, eos_ids)
            else:
                path, bonus = verify_sampling(tree, logits, params, generator, eos_ids)
            cache.keep([0] + [node + 1 for node in path])
            new = [tree.tokens[node] for node in path] + [bonus]
            stats.record_step(len(tree), len(path))
            drafter.observe(StepResult(tree, path, new, logits))
            kept = []
            for token in new:  # one at a time, so nothing after EOS or max_new_tokens leaks out
                kept.append(token)
                generated.append(token)
                finish = self._finish_reason(generated, eos_ids, max_new)
                if finish:
                    break
            state.tokens.extend(kept)
            yield out.add(kept)
        yield out.finish()
        stats.num_generated_tokens = len(generated)
        stats.wall_time_s = time.perf_counter() - start
        return GenerationResult(
            text=out.text,
            token_ids=generated,
            num_prompt_tokens=len(prompt),
            num_generated_tokens=len(generated),
            finish_reason="stop" if out.stopped or (generated[-1] in eos_ids) else "length",
            method=drafter.name,
            model=self.model_name,
            stats=stats,
        )

    def _prefill(self, prompt: list[int], cache, stats: RequestStats) -> torch.Tensor:
        for begin in range(0, len(prompt), PREFILL_CHUNK):
            chunk = prompt[begin : begin + PREFILL_CHUNK]
            logits = self.model.forward(
                torch.tensor(chunk), torch.arange(begin, begin + len(chunk)), cache, last_logits_only=True
            )
            cache.commit(len(chunk))
            stats.forward_passes += 1
        return logits

    @staticmethod
    def _finish_reason(generated: list[int], eos_ids: frozenset[int], max_new: int) -> str | None:
        if generated[-1] in eos_ids:
            return "stop"
        if len(generated) >= max_new:
            return "length"
        return None
