"""Resolve a model name or path and load it: the one entry point the engine and CLI use."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FastDecodeError
from ..tokenizer import Tokenizer
from . import gguf_cache, weights as formats
from .checkpoint import read_config, read_tokenizer, read_weights
from .contract import CausalLM
from .families import build
from .registry import MODELS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The fastest dtype whose forward is batch-invariant (tests/test_batch_invariance.py): speculative
# decoding in it gives token-for-token the plain decoding output of the same dtype.
DEFAULT_DTYPE = "bfloat16"
WEIGHT_FORMATS = formats.WEIGHT_FORMATS


@dataclass
class LoadedModel:
    name: str
    model: CausalLM
    tokenizer: Tokenizer
    load_time_s: float
    weights: str = "gguf"  # the weight format it was loaded in (models/weights.py)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise FastDecodeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def model_source(name_or_path: str | Path) -> Path:
    """The GGUF file or checkpoint folder that a model name or path stands for."""
    key = str(name_or_path)
    if key in MODELS:
        return MODELS[key].gguf_path()
    path = Path(key).expanduser()
    if (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and (path / "config.json").exists()):
        return path
    if path.exists():
        raise FastDecodeError(f"{path} is neither a .gguf file nor a folder with a config.json")
    raise FastDecodeError(
        f"unknown model {key!r}; known models: {', '.join(MODELS)} "
        "(or give the path of a .gguf file or of a Hugging Face checkpoint folder)"
    )


def model_folder(name_or_path: str | Path, dtype: torch.dtype) -> Path:
    """A folder holding config.json, tokenizer files and safetensors weights for this model."""
    source = model_source(name_or_path)
    return gguf_cache.prepare(source, dtype) if source.is_file() else source


def weight_files(folder: Path, dtype: torch.dtype) -> list[Path]:
    cached = folder / f"weights-{str(dtype).removeprefix('torch.')}.safetensors"
    if cached.exists():
        return [cached]
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("weights-"))
    if not files:
        raise FastDecodeError(f"{folder} has no .safetensors weight files")
    return files


def load(name_or_path: str | Path, dtype: str | torch.dtype = DEFAULT_DTYPE, weights: str | None = None) -> LoadedModel:
    """dtype: the activations' and KV cache's; weights: the weight format (models/weights.py),
    None for the source's default (a GGUF file's own formats; a checkpoint's weights in dtype)."""
    start = time.perf_counter()
    dtype = parse_dtype(dtype)
    source = model_source(name_or_path)
    weights = formats.resolve(source, weights, dtype)
    dense = formats.DENSE.get(weights)
    if source.is_file():
        folder = gguf_cache.prepare(source, dense)  # config and tokenizer; dequantized weights for a dense format
        config = read_config(folder)
        if dense is None:
            tensors = formats.gguf_weights(source, gguf_cache.tensor_table(folder), config, requantize=weights == "q8_0")
        else:
            tensors = read_weights(weight_files(folder, dense), dense)
    else:
        folder, config = source, read_config(source)
        tensors = read_weights(weight_files(folder, dense or torch.float32), dense or torch.float32)
        if weights == "q8_0":
            tensors = formats.quantize_matrices(tensors)
    model = build(config, tensors, dtype)
    return LoadedModel(str(name_or_path), model, read_tokenizer(folder), time.perf_counter() - start, weights)
