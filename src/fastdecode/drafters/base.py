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
from ..models.contract import CausalLM
from ..served import ServedModel
from ..runtime.kv_cache import KVCache
from ..runtime.sampling import SamplingParams
from ..runtime.tree import DraftTree


@dataclass
class DecodeState:
    tokens: list[int]  # prompt + generated so far; the last one is the root of the next draft
    num_prompt_tokens: int
    params: SamplingParams
    # The target model and its KV cache, for self-speculation (layerskip). A drafter may run
    # target layers into rows at and beyond cache.length (commit them while drafting, then
    # rollback(length) before returning); the verify forward overwrites those rows.
    model: CausalLM | None = None
    cache: KVCache | None = None


# The model a drafter drafts for, given to drafters that declare `needs_target = True`.
Target = ServedModel


@dataclass
class StepResult:
    """What the verifier made of a proposal, in the proposal's own node numbers.

    The engine may verify only part of a proposal (the size cut, runtime/draft_size.py); `rows`
    says which part: node i was verified in row rows[i] of the forward (row 0 is the root), or
    was cut when rows[i] is -1. So a drafter reads its results by its own indices and keeps no map.
    """

    tree: DraftTree  # the tree as proposed
    rows: list[int]  # verify row of each proposed node, -1 for nodes cut before the forward
    accepted: list[int]  # accepted proposed nodes, root to leaf
    new_tokens: list[int]  # the accepted tokens plus the bonus token
    logits: torch.Tensor  # [verified nodes + 1, vocab] target logits of the verify rows
    # States at the drafter's hidden_layers of the rows this step committed: the root, then each
    # accepted row in order ([len(accepted) + 1, k, hidden]); whoever proposed those nodes.
    hidden: torch.Tensor | None = None
    # The target's logits [m, vocab] at each chain of the drafter's placeholder rows
    # (Drafter.placeholders), by the proposed node it hung after (-1: the root; DraftTree.hangs),
    # or None when the step ran without them. A chain whose node was cut is missing.
    placeholder_logits: dict[int, torch.Tensor] | None = None

    @classmethod
    def whole(cls, tree: DraftTree, accepted: list[int], new_tokens: list[int], logits: torch.Tensor,
              hidden: torch.Tensor | None = None) -> "StepResult":
        """The result of verifying all of `tree` (row i + 1 is node i)."""
        return cls(tree, list(range(1, len(tree) + 1)), accepted, new_tokens, logits, hidden)

    def tried(self) -> list[int]:
        """Verified nodes whose parent was accepted (or is the root): the target really judged
        them. A node under a rejected parent tells nothing about the node itself."""
        taken = set(self.accepted)
        return [i for i, (row, parent) in enumerate(zip(self.rows, self.tree.parents))
                if row >= 0 and (parent < 0 or parent in taken)]


def check_options(method: str, checks: list[tuple[Callable[[], bool], str]]) -> None:
    """Raise a clear error for the first failed check (checks run in order, lazily)."""
    for ok, message in checks:
        if not ok():
            raise FastDecodeError(f"{method}: {message}")


class Drafter(Protocol):
    name: str
    summary: str  # one line for `fastdecode methods`
    lossless: bool  # False: its output may differ from plain decoding (labelled wherever chosen)
    # Decoder layers whose output states the drafter reads (trained heads). The verify forward
    # captures them for its rows (StepResult.hidden) and every prefill chunk for the prompt's
    # rows (prefilled). Empty for drafters that read tokens only.
    hidden_layers: tuple[int, ...] = ()
    # Placeholder rows for the verify forward, or None (every method but lud): [m, layers, hidden]
    # float32, as models/segment.py reads them. A chain of them hangs after the root, and after each
    # node the proposal names in DraftTree.hangs: row j of a chain sits at its node's position +
    # j + 1 and sees what the node sees, the node and rows 0..j of its chain; no draft node sees
    # them, so verification is untouched. Their logits come back in StepResult.placeholder_logits
    # (and after the prompt's last prefill chunk, which carries them too, in guessed()).
    placeholders: torch.Tensor | None = None
    # False only for `ar`, the baseline: under a grammar, the engine drafts the tokens it forces
    # (runtime/grammar.py) for every method that speculates.
    speculates: bool = True

    def begin(self, prompt_ids: list[int]) -> None:
        """A new request starts."""

    def prefilled(self, start: int, hidden: torch.Tensor) -> None:
        """Prompt rows [start, start + n) went through the target; hidden [n, k, H] holds their
        states at hidden_layers. Called only for drafters that read states; a preempted request
        prefills again, so the same rows may come twice."""

    def guessed(self, placeholder_logits: torch.Tensor) -> None:
        """The prompt's last prefill chunk carried this drafter's placeholder rows (after its last
        token, causal): their logits [m, vocab] guess the tokens after the first generated one.
        Called only for drafters with placeholders."""

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        """At most `budget` nodes continuing state.tokens."""

    def observe(self, result: StepResult) -> None:
        """What the verifier made of the last proposal."""
