"""The decode loop of one request: plan a step, run its forward, complete it (see sequence.py).

    while not done:  logits = model.forward_batch([seq.plan()]);  text = seq.complete(logits)
"""
from __future__ import annotations

from typing import Iterator

from .drafters.base import Drafter
from .errors import FastDecodeError
from .models.llama import LlamaModel
from .runtime.cost_curve import CostCurve, load_or_measure
from .runtime.sampling import SamplingParams
from .sequence import GenerationResult, Sequence
from .tokenizer import Tokenizer


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

    @cost_curve.setter
    def cost_curve(self, curve: CostCurve) -> None:
        """Size drafts on this curve instead (one measured elsewhere, or a fixed one in tests)."""
        self._cost_curve = curve

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
        seq = Sequence(self, prompt, params, drafter)
        while not seq.done:
            text = seq.complete(self.model.forward_batch([seq.plan()]))
            if text is not None:
                yield text
        last, result = seq.close()
        yield last
        return result
