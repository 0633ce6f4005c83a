"""Read a GGUF file: metadata, tensors dequantized to float32 with the `gguf` package, or a
tensor's raw blocks as stored (for the kernels of its own formats, models/quant.py). Raw blocks
are read through a table of the tensors (TensorInfo: name, type, shape, where its bytes are),
which the model cache keeps, so that loading does not parse the file's metadata again.

GGUF lists a tensor's dimensions innermost first (ne0, ne1, ...); numpy wants them outermost first,
so shapes are reversed on the way out. llama.cpp's converter also permutes the rows of Llama's
q/k projections to suit its rotary kernel, and adds 1 to Gemma's norm weights; `hf_tensors` says
what to undo, so a GGUF file and a Hugging Face checkpoint give the native model the same weights.
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

    def model_config(self) -> ModelConfig:
        """The config from the `<architecture>.*` metadata (models/families.py names the ones run)."""
        from .families import FAMILIES, GGUF_ARCHITECTURES, unsupported

        arch = self.architecture
        if arch not in GGUF_ARCHITECTURES:
            raise unsupported(f"{self.path.name}: architecture", arch, GGUF_ARCHITECTURES)
        f = lambda key, default=None: self.field(f"{arch}.{key}", default)  # noqa: E731
        heads = int(f("attention.head_count"))
        hidden = int(f("embedding_length"))
        layers = int(f("block_count"))
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
        head_dim = int(f("attention.key_length") or f("rope.dimension_count") or hidden // heads)
        gemma = GGUF_ARCHITECTURES[arch] == "gemma3"
        window = f("attention.sliding_window")
        layer_types = None
        if gemma and window:
            # llama.cpp's Gemma-3: every sixth layer global, the others local with a base of 10k
            # (a file may say so: sliding_window_pattern, a period or one flag per layer)
            pattern = f("attention.sliding_window_pattern", 6)
            sliding = list(pattern) if isinstance(pattern, list) else [(i + 1) % int(pattern) != 0 for i in range(layers)]
            layer_types = tuple("sliding_attention" if s else "full_attention" for s in sliding)
        config = ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(f("feed_forward_length")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(f("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(f("rope.freq_base", 10000.0)),
            max_position_embeddings=int(f("context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            rope_scaling=rope_scaling,
            architecture=GGUF_ARCHITECTURES[arch],
            sliding_window=int(window) if window else None,
            layer_types=layer_types,
            rope_local_theta=10000.0 if gemma else None,
            query_pre_attn_scalar=float(head_dim) if gemma else None,
            attention_bias="blk.0.attn_q.bias" in names,
        )
        assert config.architecture in FAMILIES
        return config


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's sandwich norms: llama.cpp's ffn_norm is the pre-feedforward norm there.
_GEMMA_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
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


def hf_tensors(infos: list[TensorInfo], config: ModelConfig) -> Iterator[tuple[str, TensorInfo, int | None, float]]:
    """(Hugging Face name, tensor, heads whose rows to unpermute or None, offset to add) for each
    weight. llama.cpp permutes q/k rows for its llama architecture only (Mistral included), and
    writes Gemma's norm weights with their 1 already added: the offset -1 gives back the weights
    transformers keeps (its own GGUF loader subtracts the same 1)."""
    gemma = config.architecture == "gemma3"
    layer_names = _GEMMA_NAMES if gemma else _LAYER_NAMES
    for t in infos:
        offset = -1.0 if gemma and t.name.endswith("norm.weight") else 0.0
        if t.name in _TOP_NAMES:
            yield _TOP_NAMES[t.name], t, None, offset
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if not m or m.group(2) not in layer_names:
            if t.name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            raise FastDecodeError(f"unexpected tensor {t.name} for a {config.architecture} model")
        kind = m.group(2)
        heads = None
        if config.architecture in ("llama", "mistral") and m.group(3) == "weight":
            heads = config.num_heads if kind == "attn_q" else config.num_kv_heads if kind == "attn_k" else None
        yield f"model.layers.{m.group(1)}.{layer_names[kind]}.{m.group(3)}", t, heads, offset


def hf_state_dict(gguf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, float32 array) for the weights of a GGUF file."""
    for name, t, heads, offset in hf_tensors(gguf.tensor_infos(), config):
        arr = dequantize_raw(read_raw(gguf.path, t), t)
        arr = arr if heads is None else unpermute_rows(arr, heads)
        yield name, arr + np.float32(offset) if offset else arr
