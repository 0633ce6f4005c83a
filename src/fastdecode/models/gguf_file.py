"""Read a GGUF file: metadata, tensors dequantized to float32 with the `gguf` package, or a
tensor's raw blocks as stored (for the kernels of its own formats, models/quant.py). Raw blocks
are read through a table of the tensors (TensorInfo: name, type, shape, where its bytes are),
which the model cache keeps, so that loading does not parse the file's metadata again.

GGUF lists a tensor's dimensions innermost first (ne0, ne1, ...); numpy wants them outermost first,
so shapes are reversed on the way out. llama.cpp's converter also permutes the rows of Llama's
q/k projections to suit its rotary kernel; `llama_tensors` says which rows to put back, so a GGUF
file and a Hugging Face checkpoint give the native model the same weights.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from ..errors import FastDecodeError
from .config import ModelConfig


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # GGMLQuantizationType name: "Q4_1", "F32", ...
    shape: tuple[int, ...]  # outermost first
    offset: int  # of its data in the file
    n_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInfo":
        return cls(d["name"], d["type_name"], tuple(d["shape"]), d["offset"], d["n_bytes"])


def read_raw(path: Path, info: TensorInfo) -> np.ndarray:
    """A tensor's bytes as stored, uint8 [rows, bytes per row], read from the file (not mapped,
    so that they are not resident once used)."""
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), info.n_bytes, info.offset)
    if len(data) != info.n_bytes:
        raise FastDecodeError(f"{path.name}: tensor {info.name} is cut short")
    return np.frombuffer(data, dtype=np.uint8).reshape(int(np.prod(info.shape[:-1])), -1)


def dequantize_raw(raw: np.ndarray, info: TensorInfo) -> np.ndarray:
    """float32 array [*shape] of a tensor's raw bytes, with the gguf package's dequantize."""
    kind = GGMLQuantizationType[info.type_name]
    try:
        values = raw.view(np.float32) if kind == GGMLQuantizationType.F32 else dequantize(raw, kind)
    except NotImplementedError as exc:
        raise FastDecodeError(f"tensor {info.name} has type {info.type_name}, which the gguf package "
                              "cannot dequantize") from exc
    return np.array(values.reshape(info.shape), dtype=np.float32)  # a writable copy


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

    def tensor_infos(self) -> list[TensorInfo]:
        return [TensorInfo(t.name, t.tensor_type.name, tuple(reversed([int(d) for d in t.shape])), int(t.data_offset),
                           int(t.n_bytes)) for t in self.reader.tensors]

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


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves within each head's rows (of any
    row-major data: float values or rows of quantized blocks)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tensors(infos: list[TensorInfo], config: ModelConfig) -> Iterator[tuple[str, TensorInfo, int | None]]:
    """(Hugging Face name, tensor, heads whose rows to unpermute or None) for each weight."""
    for t in infos:
        if t.name in _TOP_NAMES:
            yield _TOP_NAMES[t.name], t, None
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if not m or m.group(2) not in _LAYER_NAMES:
            if t.name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            raise FastDecodeError(f"unexpected tensor {t.name} for a llama model")
        kind = m.group(2)
        heads = config.num_heads if kind == "attn_q" else config.num_kv_heads if kind == "attn_k" else None
        yield f"model.layers.{m.group(1)}.{_LAYER_NAMES[kind]}.weight", t, heads


def llama_state_dict(gguf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, float32 array) for the weights of a llama GGUF file."""
    for name, t, heads in llama_tensors(gguf.tensor_infos(), config):
        arr = dequantize_raw(read_raw(gguf.path, t), t)
        yield name, arr if heads is None else unpermute_rows(arr, heads)
