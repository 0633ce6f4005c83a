"""The model families fastdecode runs, keyed by ModelConfig.architecture: the one place that
knows which class runs which checkpoint. Everything else holds a models.contract.CausalLM."""
from __future__ import annotations

import torch

from ..errors import FastDecodeError
from .config import ModelConfig
from .contract import CausalLM
from .decoder import DecoderModel
from .gemma3 import Gemma3Model
from .llama import LlamaModel
from .qwen import QwenModel

FAMILIES: dict[str, type[DecoderModel]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,  # Llama with its own defaults; an optional sliding window
    "qwen2": QwenModel,
    "qwen3": QwenModel,
    "gemma3": Gemma3Model,
}
# Hugging Face config.json model_type -> architecture
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                  "gemma3_text": "gemma3"}
# GGUF general.architecture -> architecture (llama.cpp stores Mistral as llama)
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


def unsupported(what: str, name: str, known) -> FastDecodeError:
    return FastDecodeError(f"{what} {name!r} is not supported; fastdecode runs: {', '.join(sorted(known))}")


def architecture_of_hf(cfg: dict) -> str:
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise unsupported("model_type", model_type, HF_MODEL_TYPES)
    return HF_MODEL_TYPES[model_type]


def build(config: ModelConfig, weights: dict, dtype: torch.dtype) -> CausalLM:
    """The model of config.architecture's family, from weights in Hugging Face names."""
    family = FAMILIES.get(config.architecture)
    if family is None:
        raise unsupported("architecture", config.architecture, FAMILIES)
    return family(config, weights, dtype)
