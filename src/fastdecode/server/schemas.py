"""Request bodies of the OpenAI API as fastdecode accepts them, validated by pydantic.

Sampling fields follow OpenAI (temperature, top_p, max_tokens, stop, seed, n = 1), plus top_k and
min_p; `fastdecode` selects the method and its options for this request:
    {"fastdecode": {"method": "ngram", "options": {"max_ngram": 5}}}
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MethodChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str | None = None  # the server's --method when absent
    options: dict[str, bool | int | float | str] = Field(default_factory=dict)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    fastdecode: MethodChoice = Field(default_factory=MethodChoice)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)
