"""The decode loop of one request: plan a step, run its forward, complete it (see sequence.py).

    while not done:  logits = model.forward_batch([seq.plan()]);  text = seq.complete(logits)
"""
from __future__ import annotations

from typing import Iterator

from .drafters.base import Drafter
from .runtime.sampling import SamplingParams
from .sequence import GenerationResult, Sequence
from .served import ServedModel


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


class Engine(ServedModel):
    """A served model and the decode loop that runs one request on it at a time."""

    def generate(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter) -> GenerationResult:
        return self.stream(prompt_ids, params, drafter).consume()

    def stream(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter) -> Generation:
        self.check_prompt(prompt_ids)
        return Generation(self._run(list(prompt_ids), params, drafter))

    def _run(self, prompt: list[int], params: SamplingParams, drafter: Drafter):
        seq = Sequence(self, prompt, params, drafter)
        while not seq.done:
            with self.stepping():
                text = seq.complete(self.model.forward_batch([seq.plan()]))
            if text is not None:
                yield text
        last, result = seq.close()
        yield last
        return result
