"""The library API: `LLM(model).generate(prompt_or_messages, SamplingParams(...), method="auto")`."""
from __future__ import annotations

from .drafters import make_drafter
from .drafters.base import Drafter, Target
from .engine import Engine, Generation, GenerationResult
from .errors import FastDecodeError
from .models.loader import DEFAULT_DTYPE, load
from .models.registry import DEFAULT_MODEL
from .runtime.sampling import SamplingParams


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = DEFAULT_DTYPE, weights: str | None = None):
        """model: a registered name (see `fastdecode models`), a .gguf file or a checkpoint folder.
        dtype: of the activations and the KV cache. weights: "gguf" (a GGUF file's own formats, its
        default), "bfloat16", "float32" or "q8_0"; see models/weights.py."""
        loaded = load(model, dtype, weights)
        self.model_name = loaded.name
        self.weights = loaded.weights
        self.tokenizer = loaded.tokenizer
        self.load_time_s = loaded.load_time_s
        self.engine = Engine(loaded.model, loaded.tokenizer, loaded.name)
        self.target: Target = self.engine  # drafters draft for the served model itself
        self._drafters: dict[tuple, Drafter] = {}

    def drafter(self, method: str, **options) -> Drafter:
        """The drafter for this method and options, kept so that what it learns (history, successor
        tables) carries over from one request to the next."""
        key = (method, repr(sorted(options.items())))
        if key not in self._drafters:
            self._drafters[key] = make_drafter(method, self.target, **options)
        return self._drafters[key]

    def prompt_ids(self, prompt_or_messages: str | list[dict], raw: bool = False) -> list[int]:
        """A string is a user message sent through the chat template (plain text when `raw`);
        a list of {'role', 'content'} messages is a conversation awaiting the assistant's turn."""
        if isinstance(prompt_or_messages, str):
            if raw or not self.tokenizer.info.chat_template:
                return self.tokenizer.encode(prompt_or_messages)
            prompt_or_messages = [{"role": "user", "content": prompt_or_messages}]
        elif raw:
            raise FastDecodeError("raw=True takes a prompt string, not a list of messages")
        return self.tokenizer.encode_chat(prompt_or_messages)

    def generate(
        self,
        prompt_or_messages: str | list[dict],
        params: SamplingParams | None = None,
        method: str = "auto",
        raw: bool = False,
        **method_options,
    ) -> GenerationResult:
        return self.stream(prompt_or_messages, params, method, raw, **method_options).consume()

    def stream(
        self,
        prompt_or_messages: str | list[dict],
        params: SamplingParams | None = None,
        method: str = "auto",
        raw: bool = False,
        **method_options,
    ) -> Generation:
        """Iterate over the result for text pieces; `.result` holds the GenerationResult afterwards."""
        drafter = self.drafter(method, **method_options)
        ids = self.prompt_ids(prompt_or_messages, raw)
        return self.engine.stream(ids, params or SamplingParams(), drafter)
