"""Read a GGUF file: metadata, and every tensor dequantized to float32 with the `gguf` package.

GGUF lists a tensor's dimensions innermost first (ne0, ne1, ...); numpy wants them outermost first,
so shapes are reversed on the way out. llama.cpp's converter also permutes the rows of Llama's
q/k projections to suit its rotary kernel; `llama_state_dict` undoes that so a GGUF file and a
Hugging Face checkpoint give the native model the same weights.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from ..errors import FastDecodeError
from .config import ModelConfig


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except Exception as exc:  # the gguf package raises plain ValueErrors on bad files
            raise FastDecodeError(f"{self.path} is not a readable GGUF file: {exc}") from exc

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    @property
    def architecture(self) -> str:
        return self.field("general.architecture", "unknown")

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def tensor_types(self) -> dict[str, str]:
        return {t.name: t.tensor_type.name for t in self.reader.tensors}

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (GGUF name, float32 array) for every tensor, dequantizing one at a time."""
        for t in self.reader.tensors:
            yield t.name, self._dequantize(t)

    def tensor(self, name: str) -> np.ndarray:
        return self._dequantize(next(t for t in self.reader.tensors if t.name == name))

    def _dequantize(self, t) -> np.ndarray:
        shape = tuple(reversed([int(d) for d in t.shape]))
        try:
            if t.tensor_type == GGMLQuantizationType.F32:
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise FastDecodeError(
                f"{self.path.name}: tensor {t.name} has type {t.tensor_type.name}, which the "
                "gguf package cannot dequantize"
            ) from exc
        return np.array(arr.reshape(shape), dtype=np.float32)  # a writable copy

    def llama_config(self) -> ModelConfig:
        arch = self.architecture
        if arch != "llama":
            raise FastDecodeError(
                f"{self.path.name}: architecture {arch!r} is not supported yet (supported: llama)"
            )
        f = lambda key, default=None: self.field(f"llama.{key}", default)  # noqa: E731
        heads = int(f("attention.head_count"))
        hidden = int(f("embedding_length"))
        vocab = f("vocab_size") or len(self.reader.fields["tokenizer.ggml.tokens"].data)
        rope_scaling = None
        scaling_type = f("rope.scaling.type")
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(f("rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise FastDecodeError(f"{self.path.name}: rope scaling {scaling_type!r} is not supported yet")
        names = set(self.tensor_names())
        if "rope_freqs.weight" in names:
            factors = self.tensor("rope_freqs.weight").tolist()
            rope_scaling = {"rope_type": "frequency_factors", "factors": factors}
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(f("feed_forward_length")),
            num_layers=int(f("block_count")),
            num_heads=heads,
            num_kv_heads=int(f("attention.head_count_kv", heads)),
            head_dim=int(f("attention.key_length") or f("rope.dimension_count") or hidden // heads),
            rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(f("rope.freq_base", 10000.0)),
            max_position_embeddings=int(f("context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            rope_scaling=rope_scaling,
        )


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves within each head's rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_state_dict(gguf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, float32 array) for the weights of a llama GGUF file."""
    for name, arr in gguf.tensors():
        if name in _TOP_NAMES:
            yield _TOP_NAMES[name], arr
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if not m or m.group(2) not in _LAYER_NAMES:
            if name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            raise FastDecodeError(f"{gguf.path.name}: unexpected tensor {name} for a llama model")
        kind = m.group(2)
        if kind == "attn_q":
            arr = _unpermute_rows(arr, config.num_heads)
        elif kind == "attn_k":
            arr = _unpermute_rows(arr, config.num_kv_heads)
        yield f"model.layers.{m.group(1)}.{_LAYER_NAMES[kind]}.weight", arr
