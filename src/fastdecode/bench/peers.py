"""Peers: other engines run by `fastdecode bench` on the same prompt ids and the same model, so that
fastdecode's methods are compared with what a user could run instead.

Counting rule, the same as fastdecode's: a generation's tokens are the ids generated after the
prompt, cut right after the first end-of-sequence id (which counts), and at most max_new_tokens.
Time is the wall time of the generate call alone: prompt ids are given, nothing is tokenized.

The transformers peers load the model in the dtype asked for (from the GGUF file, dequantized, or
from a checkpoint folder); the llama.cpp peers run the GGUF file's own quantized weights.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from ..errors import FastDecodeError
from ..models.loader import model_source
from ..models.registry import MODELS

LOOKUP_TOKENS = 10  # tokens proposed per prompt lookup, in both the transformers and llama.cpp peers

PEERS: dict[str, str] = {
    "hf": "Hugging Face transformers generate, plain decoding",
    "hf-lookup": f"transformers prompt lookup decoding (prompt_lookup_num_tokens={LOOKUP_TOKENS})",
    "hf-assisted": "transformers assisted generation with a draft model (--draft-model)",
    "llamacpp": "llama.cpp (llama-cpp-python) plain decoding of the GGUF file's quantized weights",
    "llamacpp-lookup": f"llama-cpp-python prompt lookup decoding (LlamaPromptLookupDecoding, {LOOKUP_TOKENS} tokens)",
}
# The plain peer whose greedy output each speculative peer must reproduce token for token.
REFERENCES: dict[str, str] = {"hf-lookup": "hf", "hf-assisted": "hf", "llamacpp-lookup": "llamacpp"}

HF_INSTALL = "pip install transformers accelerate"
LLAMACPP_INSTALL = "pip install llama-cpp-python (or pip install 'fastdecode[llamacpp]')"


@dataclass(frozen=True)
class PeerOutput:
    token_ids: list[int]  # cut right after the first EOS id (included), at most max_new_tokens
    time_s: float  # wall time of the generate call only


class Peer(Protocol):
    name: str
    reference: str | None

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> PeerOutput: ...


def check_peers(names: list[str]) -> None:
    for name in names:
        if name not in PEERS:
            raise FastDecodeError(f"unknown peer {name!r}; available peers: {', '.join(PEERS)}")


def _is_gguf(model: str) -> bool:
    return model in MODELS or model.endswith(".gguf")  # every registered model ships as a GGUF file


def unavailable_reason(name: str, model: str, draft_model: str | None) -> str | None:
    """None when the peer can run; else one line saying what is missing and how to get it."""
    check_peers([name])
    if name.startswith("hf"):
        if importlib.util.find_spec("transformers") is None:
            return f"transformers is not installed: {HF_INSTALL}"
        if name == "hf-assisted" and draft_model is None:
            return "needs --draft-model (a smaller model with the target's tokenizer)"
        return None
    if not _is_gguf(model):
        return f"llama.cpp runs a .gguf model file only, and {model!r} is not one"
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {LLAMACPP_INSTALL}"
    return None


def cut_after_eos(ids: Iterable[int], eos_ids: Iterable[int], max_new_tokens: int) -> list[int]:
    """The counting rule: ids up to and including the first EOS id, at most max_new_tokens."""
    eos, out = set(eos_ids), []
    for token in ids:
        if len(out) == max_new_tokens:
            break
        out.append(token)
        if token in eos:
            break
    return out


@contextlib.contextmanager
def _quiet():
    """Silences progress bars and C-level logging (llama.cpp warns on fd 2 despite verbose=False)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_peer(name: str, model: str, dtype: str, draft_model: str | None = None) -> Peer:
    """A ready peer; loading the same peer again gives the same object, and peers of one family
    share loaded models (hf, hf-lookup and hf-assisted one transformers target)."""
    from ..models.loader import parse_dtype

    check_peers([name])
    parse_dtype(dtype)  # a bad dtype is reported before anything else
    reason = unavailable_reason(name, model, draft_model)
    if reason is not None:
        raise FastDecodeError(f"peer {name!r} is unavailable: {reason}")
    return _load_peer(name, model, dtype, draft_model if name == "hf-assisted" else None)


@functools.cache
def _load_peer(name: str, model: str, dtype: str, draft_model: str | None) -> Peer:
    if name.startswith("hf"):
        draft = _hf_model(draft_model, dtype) if draft_model else None
        return HFPeer(name, _hf_model(model, dtype), draft)
    return LlamaCppPeer(name, model_source(model))


# --- transformers ---------------------------------------------------------------------------------


@functools.cache
def _hf_model(model: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..models.loader import parse_dtype

    hf_logging.set_verbosity_error()
    path = model_source(model)
    gguf = {"gguf_file": path.name} if path.is_file() else {}
    with _quiet():  # the GGUF conversion draws progress bars
        m = AutoModelForCausalLM.from_pretrained(path.parent if gguf else path, **gguf, dtype=parse_dtype(dtype)).eval()
    # The checkpoint's sampling defaults (top_k=50, ...) would make sampling differ from plain
    # temperature sampling, the only kind the bench compares.
    m.generation_config.temperature = m.generation_config.top_p = m.generation_config.top_k = None
    return m


def _eos_ids(m) -> list[int]:
    ids = set()
    for value in (m.generation_config.eos_token_id, m.config.eos_token_id):
        ids.update([value] if isinstance(value, int) else value or [])
    return sorted(ids)


class HFPeer:
    """hf, hf-lookup or hf-assisted: transformers `generate`, batch of one, no padding."""

    def __init__(self, name: str, model, draft=None):
        self.name = name
        self.reference = REFERENCES.get(name)
        self.model = model
        self.eos_ids = _eos_ids(model)
        self.options = {}
        if name == "hf-lookup":
            self.options["prompt_lookup_num_tokens"] = LOOKUP_TOKENS
        elif name == "hf-assisted":
            self.options["assistant_model"] = draft

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> PeerOutput:
        import torch

        x = torch.tensor([prompt_ids])
        if temperature > 0:  # plain temperature sampling: no top-k, no top-p
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            sampling = dict(do_sample=False)
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
                pad_token_id=(self.eos_ids or [None])[0], **sampling, **self.options,
            )
        elapsed = time.perf_counter() - start
        return PeerOutput(cut_after_eos(out[0, len(prompt_ids):].tolist(), self.eos_ids, max_new_tokens), elapsed)


# --- llama.cpp ------------------------------------------------------------------------------------


class LlamaCppPeer:
    """llamacpp or llamacpp-lookup: llama-cpp-python's token generator, stopped at EOS or the limit.

    Each peer holds its own Llama (lookup needs logits_all=True, which plain decoding should not
    pay for). The context grows, by rebuilding the Llama, when a prompt needs more room."""

    def __init__(self, name: str, path: Path):
        self.name = name
        self.reference = REFERENCES.get(name)
        self.path = path
        self.n_ctx = 0
        self.llm = None
        self._fit(2048)
        # The GGUF's eos id, the one transformers reads too (its eot id may be another token).
        self.eos_ids = [self.llm.token_eos()]

    def _fit(self, needed: int) -> None:
        if needed <= self.n_ctx:
            return
        import torch
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.llm = None  # frees the old context before the larger one is allocated
        self.n_ctx = 1 << (needed - 1).bit_length()
        draft = {}
        if self.name == "llamacpp-lookup":  # drafting checks every drafted position: all logits
            draft = dict(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS), logits_all=True)
        threads = torch.get_num_threads()
        with _quiet():
            self.llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=threads,
                             n_threads_batch=threads, verbose=False, **draft)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> PeerOutput:
        # Room for the drafted tokens too, which lookup evaluates beyond the last accepted one.
        self._fit(len(prompt_ids) + max_new_tokens + LOOKUP_TOKENS + 1)
        llm = self.llm
        # Without a reset, generate keeps the KV cache rows of a matching prefix: a repeated prompt
        # would be timed without its evaluation, and evaluated in other batches, which changes
        # llama.cpp's logits. After reset() the first eval drops every cached row.
        llm.reset()
        llm.set_seed(seed)
        # top_k=0, top_p=1, min_p=0: plain temperature sampling; temp=0 is greedy.
        if temperature > 0:
            params = dict(temp=temperature, top_k=0, top_p=1.0, min_p=0.0)
        else:
            params = dict(temp=0.0, top_k=1)
        eos, out = set(self.eos_ids), []
        start = time.perf_counter()
        if max_new_tokens > 0:
            for token in llm.generate(prompt_ids, reset=True, repeat_penalty=1.0, **params):
                out.append(token)
                if token in eos or len(out) == max_new_tokens:
                    break
        return PeerOutput(out, time.perf_counter() - start)
