"""The model being served: its weights, tokenizer, name, context window and this machine's cost curve.

One typed object that the decode loop (engine.py), the scheduler, each request's steps (sequence.py)
and the drafters that need the target (drafters/base.Target) all share, rather than each keeping its
own copy of some of these.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import FastDecodeError
from .kernels import native_lib
from .models.contract import CausalLM
from .runtime.cost_curve import CostCurve, load_or_measure
from .tokenizer import Tokenizer


class ServedModel:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self._cost_curve: CostCurve | None = None

    @property
    def context_window(self) -> int:
        """Tokens a request may hold, prompt and generated together."""
        return self.model.config.max_position_embeddings

    @property
    def cost_curve(self) -> CostCurve:
        """This machine's forward-latency curve for the model (stored, or measured on first use)."""
        if self._cost_curve is None:
            self._cost_curve = load_or_measure(self.model, self.name)
        return self._cost_curve

    @cost_curve.setter
    def cost_curve(self, curve: CostCurve) -> None:
        """Size drafts on this curve instead (one measured elsewhere, or a fixed one in tests)."""
        self._cost_curve = curve

    @contextmanager
    def stepping(self):
        """The context a decode step (plan, forward, complete) runs in: PyTorch on the calling
        thread only, when the native kernels run the forward on threads of their own. Between its
        small operations in a step (sampling, trained heads) PyTorch's OpenMP threads busy-wait on
        the cores the kernels then need: measured on 2 cores, sampled `ar` ran at 66-75 tokens/s
        with them and 110-127 without, `eagle` (greedy) at 68 and 97. Restored after each step, so
        that PyTorch work elsewhere in the process (training, other engines) keeps every thread."""
        if native_lib() is None:
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise FastDecodeError("the prompt is empty")
        if len(prompt_ids) >= self.context_window:
            raise FastDecodeError(
                f"the prompt has {len(prompt_ids)} tokens; the context window of {self.name} "
                f"is {self.context_window} tokens (prompt plus generated)"
            )
