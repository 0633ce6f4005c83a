"""The Drafter protocol: what a decoding method implements (one file per method).

A drafter sees the text so far and proposes a DraftTree; the engine verifies it in one forward and
reports back what was accepted. A drafter never touches the verifier or the engine; only
self-speculation (layerskip) runs the target model, into cache rows the verify forward overwrites.
Nodes carry optional scores (estimated acceptance, used to size the tree on this machine's cost
curve), draft probabilities (exact sampling) and keep marks (see runtime/tree.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..errors import FastDecodeError
from ..models.llama import LlamaModel
from ..runtime.kv_cache import KVCache
from ..runtime.sampling import SamplingParams
from ..runtime.tree import DraftTree
from ..tokenizer import Tokenizer


@dataclass
class DecodeState:
    tokens: list[int]  # prompt + generated so far; the last one is the root of the next draft
    num_prompt_tokens: int
    params: SamplingParams
    # The target model and its KV cache, for self-speculation (layerskip). A drafter may run
    # target layers into rows at and beyond cache.length (commit them while drafting, then
    # rollback(length) before returning); the verify forward overwrites those rows.
    model: LlamaModel | None = None
    cache: KVCache | None = None


@dataclass
class Target:
    """The model a drafter drafts for, given to drafters that declare `needs_target = True`."""

    model: LlamaModel
    tokenizer: Tokenizer
    name: str


@dataclass
class StepResult:
    tree: DraftTree
    accepted: list[int]  # accepted node indices, root to leaf
    new_tokens: list[int]  # the accepted tokens plus the bonus token
    logits: torch.Tensor  # [len(tree) + 1, vocab] target logits of the verify rows


def check_options(method: str, checks: list[tuple[Callable[[], bool], str]]) -> None:
    """Raise a clear error for the first failed check (checks run in order, lazily)."""
    for ok, message in checks:
        if not ok():
            raise FastDecodeError(f"{method}: {message}")


class Drafter(Protocol):
    name: str
    summary: str  # one line for `fastdecode methods`
    lossless: bool  # False: its output may differ from plain decoding (labelled wherever chosen)

    def begin(self, prompt_ids: list[int]) -> None:
        """A new request starts."""

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        """At most `budget` nodes continuing state.tokens."""

    def observe(self, result: StepResult) -> None:
        """What the verifier made of the last proposal."""
