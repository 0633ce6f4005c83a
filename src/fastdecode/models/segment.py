"""The batch contract: one sequence's rows in a batched forward (models/contract.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.kv_cache import KVCache


@dataclass
class Segment:
    """One sequence's rows in a batched forward: tokens [n], positions [n], its own cache, and
    mask [n, n] (ancestor-or-self among the new rows) or None for causal."""
    tokens: torch.Tensor
    positions: torch.Tensor
    cache: KVCache
    mask: torch.Tensor | None = None
    last_only: bool = False  # logits of its last row only (a prefill chunk), and of its placeholder rows
    capture: tuple[int, ...] = ()  # decoder layers whose output states this segment wants
    hidden: torch.Tensor | None = None  # set by the forward: [n, len(capture), hidden_size] float32
    # Its first rows that are its request's prompt: their products may take another path (AMX tiles
    # with FASTDECODE_AMX=prompts, kernels/matmul.c), chosen by what a row is, never by how many
    # rows share the call.
    prompt_rows: int = 0
    # [m, layers, hidden] float32, or None: its last m rows are placeholders (Lexical Unit
    # Decoding, drafters/lud.py). Their token ids are ignored: the residual stream of placeholder j
    # starts at zero and gets placeholders[j, l] added before decoder layer l. Every other row, and
    # every kernel, is as without them.
    placeholders: torch.Tensor | None = None

    @property
    def placeholder_rows(self) -> int:
        return 0 if self.placeholders is None else len(self.placeholders)
