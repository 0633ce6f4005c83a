"""Request bodies of the OpenAI API as fastdecode accepts them, validated by pydantic (strict types,
no NaN or infinities, unknown fields refused).

Every field a client may send is either honoured or refused with a 400 naming it; nothing is
silently dropped. Honoured: model, messages / prompt, max_tokens, max_completion_tokens,
temperature, top_p, n (1..MAX_N), stop (a string or up to 4), seed, stream, stream_options,
presence_penalty, frequency_penalty, logit_bias, logprobs, top_logprobs (chat) and user; the
extensions top_k, min_p and repetition_penalty (as vLLM), and `fastdecode`:
    {"fastdecode": {"method": "ngram", "options": {"max_ngram": 5}, "show_tokens": true}}
Accepted because they change nothing here: store false, service_tier auto/default, modalities
["text"], prompt_cache_key, safety_identifier, echo false, best_of 1, suffix null.
response_format: text, json_object or json_schema (structured output, runtime/grammar.py).
Refused (see unsupported()): tools and the rest of function calling,
audio, prediction, reasoning_effort, web_search_options, metadata, ...
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..runtime.grammar import Constraint

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings, as OpenAI
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # entries (OpenAI: 300)
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETIONS = 5
MAX_MESSAGES = 1024

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class MethodChoice(BaseModel):
    model_config = STRICT
    method: str | None = None  # the server's --method when absent
    # Checked against the server's table of client-settable options (server/options.py).
    options: dict[str, bool | int | float | str] = Field(default_factory=dict, max_length=16)
    show_tokens: bool = False  # each token's text and source (the drafter that proposed it) in the response


class JSONSchemaFormat(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # enforced either way: the output always follows the schema


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, json_object (any JSON object), or json_schema (one schema)."""
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def constraint(self) -> Constraint | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Constraint("json_object")
        if self.json_schema is None:
            raise ValueError("response_format of type json_schema needs its json_schema: {name, schema, strict}")
        return Constraint.json_schema(self.json_schema.schema_)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI pads chunks against side channels; nothing is padded here


class Sampling(BaseModel):
    model_config = STRICT
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=1 << 20)
    min_p: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63 - MAX_N)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    user: str | None = Field(default=None, max_length=512)  # accepted, as OpenAI: an end-user id for abuse reports
    safety_identifier: str | None = Field(default=None, max_length=512)
    prompt_cache_key: str | None = Field(default=None, max_length=512)  # the prefix cache needs no key
    store: bool | None = None
    service_tier: str | None = None
    fastdecode: MethodChoice = Field(default_factory=MethodChoice)
    # Known OpenAI features that fastdecode does not have: present (and not their neutral value), a 400.
    response_format: ResponseFormat | None = None  # structured output (runtime/grammar.py)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    metadata: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    modalities: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be non-empty and at most {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias):
        for key, value in (bias or {}).items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys must be token ids (strings of digits), not {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], not {value}")
        return bias

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) of the first feature asked for that this server does not have."""
        neutral = {
            "tool_choice": lambda v: v == "none",
            "parallel_tool_calls": lambda v: False,
            "modalities": lambda v: v == ["text"],
            "store": lambda v: v is False,
            "service_tier": lambda v: v in ("auto", "default"),
        }
        for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                     "metadata", "audio", "prediction", "reasoning_effort", "web_search_options", "verbosity",
                     "modalities", "store", "service_tier"):
            value = getattr(self, name)
            if value is None or neutral.get(name, lambda v: False)(value):
                continue
            what = {
                "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
                "function_call": "function calling", "parallel_tool_calls": "tool calling",
                "metadata": "stored completions (metadata)", "store": "stored completions",
                "service_tier": "service tiers other than auto/default",
            }.get(name, name)
            return name, f"{name}: {what} is not supported yet by fastdecode"
        return None


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content):
        if isinstance(content, list):
            for i, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}: only text parts are supported")
        return content

    def plain(self) -> dict:
        """As the chat template takes it: developer is system; text parts joined by newlines (as vLLM)."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS_CHAT)

    def logprobs_k(self) -> int | None:
        """SamplingParams.logprobs: None (off) or how many alternatives each token lists."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS_COMPLETIONS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo: echoing the prompt is not supported yet by fastdecode"
        if self.best_of not in (None, 1):
            return "best_of", "best_of: only 1 is supported (use n for several choices)"
        if self.suffix:
            return "suffix", "suffix: insertion (a suffix after the completion) is not supported"
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)) and len(self.prompt) > 1:
            return "prompt", "prompt: one prompt per request (a list of several prompts is not supported; send one request each)"
        return super().unsupported()

    def single_prompt(self) -> str | list[int]:
        """The prompt as one string or one list of token ids."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            p = p[0]
        if (isinstance(p, str) and not p) or (isinstance(p, list) and not p):
            raise ValueError("the prompt is empty")
        return p
