"""Weight formats: how a model's matrices are held in memory and multiplied (`--weights`).

    gguf      the GGUF file's own block formats, exact (Q4_0, Q4_1, Q8_0, Q5_0, Q4_K, Q6_K), packed
              once for the kernels: the default for a GGUF file. A tensor of a type without a kernel
              is quantized to Q8_0 at load, and one line on stderr says so.
    bfloat16  dequantized and rounded to bfloat16 (for a GGUF file) or as the checkpoint has them:
    float32   the weights before the GGUF formats existed here (the default for a checkpoint folder
              is its compute dtype's)
    q8_0      every matrix quantized at load to Q8_0 (llama.cpp's rounding): 8-bit weights for a
              checkpoint folder, or for a GGUF file whose types have no kernel

`--dtype` is independent of it: the dtype of the activations that meet the weights in the matrix
products, and of the KV cache. Norm weights are float32 in every format.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import FastDecodeError
from .config import ModelConfig
from .gguf_file import TensorInfo, dequantize_raw, hf_tensors, read_raw, unpermute_rows
from .quant import KERNEL_TYPES, PackedMatrix, decode, from_gguf, quantize_q8_0

WEIGHT_FORMATS = ("gguf", "bfloat16", "float32", "q8_0")
DENSE = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_FLOAT_TYPES = {"F32", "F16", "BF16"}


def resolve(source: Path, weights: str | None, dtype: torch.dtype) -> str:
    """The weight format to load `source` in: `weights` checked, or the source's default."""
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise FastDecodeError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if source.is_file():
        return weights or "gguf"
    if weights == "gguf":
        raise FastDecodeError(f"--weights gguf needs a .gguf file; {source} is a checkpoint folder "
                              f"(choose {', '.join(w for w in WEIGHT_FORMATS if w != 'gguf')})")
    return weights or str(dtype).removeprefix("torch.")


def gguf_weights(path: Path, infos: list[TensorInfo], config: ModelConfig,
                 requantize: bool = False) -> dict[str, torch.Tensor | PackedMatrix]:
    """The matrices of a GGUF file in its own formats, read tensor by tensor (never the whole
    model in float32). requantize: every matrix as Q8_0 instead (Q8_0 tensors stay as they are)."""
    out, fallback = {}, {}
    for name, t, heads, offset in hf_tensors(infos, config):
        raw = read_raw(path, t)
        if len(t.shape) == 1:  # norms and biases
            out[name] = torch.from_numpy(dequantize_raw(raw, t)) + offset
        elif t.type_name in KERNEL_TYPES and (not requantize or t.type_name == "Q8_0"):
            out[name] = from_gguf(t.type_name, raw if heads is None else unpermute_rows(raw, heads))
        else:
            # our decoders give the gguf package's values, faster
            values = decode(t.type_name, raw).values() if t.type_name in KERNEL_TYPES else torch.from_numpy(dequantize_raw(raw, t))
            values = values if heads is None else torch.from_numpy(unpermute_rows(values.numpy(), heads))
            if t.type_name in _FLOAT_TYPES and not requantize:
                out[name] = values.bfloat16() if t.type_name == "BF16" else values  # exact either way
            else:
                out[name] = quantize_q8_0(values)
                fallback[t.type_name] = fallback.get(t.type_name, 0) + 1
    if fallback and not requantize:
        kinds = ", ".join(f"{k} ({n} tensors)" for k, n in sorted(fallback.items()))
        print(f"fastdecode: {path.name}: no kernel for {kinds}; quantized to q8_0 at load", file=sys.stderr)
    return out


def quantize_matrices(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | PackedMatrix]:
    """q8_0 for a checkpoint's dense weights: every matrix quantized, the norms kept as float32."""
    out = {}
    for name in list(weights):
        w = weights.pop(name)
        if w.dim() == 2:
            if w.shape[1] % 32:
                raise FastDecodeError(f"{name}: q8_0 needs rows of whole 32-value blocks, not {w.shape[1]}")
            out[name] = quantize_q8_0(w)
        else:
            out[name] = w.float()
    return out
