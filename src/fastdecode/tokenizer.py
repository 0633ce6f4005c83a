"""Tokenizer, chat template and incremental detokenization.

Encoding and decoding run on the `tokenizers` library from a tokenizer.json; the chat template is a
Jinja template rendered the way Hugging Face renders it. A GGUF file's tokenizer is converted once
by transformers and cached as tokenizer.json (see models/weight_cache.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .errors import FastDecodeError

ROLES = ("system", "user", "assistant")


@dataclass
class TokenizerInfo:
    bos_token: str | None
    eos_token: str | None
    bos_id: int | None
    eos_ids: list[int] = field(default_factory=list)  # any of these ends a generation
    add_bos: bool = False
    chat_template: str | None = None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "TokenizerInfo":
        return cls(**json.loads(path.read_text()))


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable bytes stand for themselves, the
    others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _raise_exception(message):
    raise FastDecodeError(f"chat template: {message}")


class Tokenizer:
    def __init__(self, tokenizer_json: str | Path, info: TokenizerInfo):
        self._tok = _HFTokenizer.from_file(str(tokenizer_json))
        self.info = info
        self.eos_ids = frozenset(info.eos_ids)
        self._template = None
        if info.chat_template:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_exception
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            self._template = env.from_string(info.chat_template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, with the BOS token when the model expects one."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.info.add_bos and self.info.bos_id is not None:
            ids = [self.info.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for (so a text of n bytes has at least n / this tokens)."""
        return max(len(self.token_bytes(i)) for i in range(self.vocab_size))

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json holds it (for llguidance, runtime/grammar.py)."""
        return self._tok.to_str()

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for. A byte-level BPE token may hold part of a UTF-8 character,
        which decoding alone would turn into U+FFFD; its own bytes keep it joinable."""
        piece = self._tok.id_to_token(token)
        table = _byte_level_alphabet() if "ByteLevel" in repr(self._tok.decoder) else {}
        if piece is not None and table and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return self.decode([token]).encode()

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        check_messages(messages)
        if self._template is None:
            raise FastDecodeError("this model has no chat template; send the prompt as raw text (--raw)")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.info.bos_token or "",
            eos_token=self.info.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the special tokens itself, BOS included when the model wants it.
        return self._tok.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False).ids


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise FastDecodeError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise FastDecodeError(f"message {i} must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise FastDecodeError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character.

    It decodes a small window of recent tokens twice (with and without the newest ones) and emits
    the difference, holding it back while it ends in U+FFFD: a byte-level token that completes a
    character has not arrived yet. The window keeps decoding cost constant per step and keeps
    tokenizers that strip a leading space at the start of a decode from eating real spaces.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens before this are already in self.text

    def add(self, new_ids: list[int]) -> str:
        """Append token ids; return the newly complete text (possibly empty)."""
        self.ids.extend(new_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read])
        after = decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """At the end of generation: whatever is left, incomplete characters included."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read])
        after = decode(self.ids[self._prefix :])
        piece = after[len(before) :] if after.startswith(before) else ""
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece
