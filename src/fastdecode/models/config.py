"""Architecture hyper-parameters of a Llama-family model, read from GGUF metadata or config.json."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..errors import FastDecodeError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    # Hugging Face style rope_scaling dict ({"rope_type": "linear" | "llama3", ...}) or None.
    rope_scaling: dict | None = field(default=None)
    architecture: str = "llama"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a Hugging Face config.json of a Llama-family checkpoint."""
        model_type = cfg.get("model_type")
        if model_type not in ("llama", "mistral"):
            raise FastDecodeError(
                f"model_type {model_type!r} is not supported yet; supported: llama (and mistral "
                "without sliding window)"
            )
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise FastDecodeError("Llama checkpoints with attention or MLP biases are not supported yet")
        if model_type == "mistral" and cfg.get("sliding_window"):
            raise FastDecodeError("Mistral checkpoints with a sliding window are not supported yet")
        heads = cfg["num_attention_heads"]
        # transformers >= 5 writes "rope_parameters" (theta included); older versions
        # "rope_theta" and an optional "rope_scaling".
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            rope_scaling=rope or None,
        )


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim/2] (fp64), with the config's rope scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(middle, blended, out)
    if kind == "frequency_factors":
        # GGUF llama3 files store the per-pair divisors directly (tensor rope_freqs.weight).
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)
    raise FastDecodeError(f"rope scaling type {kind!r} is not supported yet (supported: linear, llama3)")
