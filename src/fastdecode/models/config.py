"""Architecture hyper-parameters of a decoder model, read from GGUF metadata or config.json.

`architecture` names the model family (models/families.py picks the class that runs it); the
fields after it are the options some families use, each with the value that means "absent", so
that a config written before they existed (a model cache folder) reads as the Llama it was.
"""
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
    # Sliding-window attention: a row at position p sees keys at positions > p - sliding_window,
    # in the layers that layer_types marks "sliding_attention" (every layer when layer_types is None).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # the rotary base of the sliding layers (Gemma-3), else rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale 1 / sqrt(this) (Gemma), else head_dim
    attention_bias: bool = False  # biases on q, k, v (Qwen2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)

    def window(self, layer: int) -> int:
        """The sliding window of a decoder layer, 0 where it attends to every key."""
        if not self.sliding_window:
            return 0
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return 0
        return int(self.sliding_window)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a Hugging Face config.json (the families of models/families.py)."""
        from .families import architecture_of_hf

        arch = architecture_of_hf(cfg)
        if cfg.get("mlp_bias"):
            raise FastDecodeError("checkpoints with MLP biases are not supported yet")
        if arch in ("llama", "mistral") and cfg.get("attention_bias"):
            raise FastDecodeError("Llama checkpoints with attention biases are not supported yet")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(key):
                raise FastDecodeError(f"{key} is not supported yet")
        heads = cfg["num_attention_heads"]
        # transformers >= 5 writes "rope_parameters" (theta included; Gemma-3: one dict per layer
        # type); older versions "rope_theta" and an optional "rope_scaling".
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        local_theta = cfg.get("rope_local_base_freq")
        if "full_attention" in rope:
            local_theta = rope.get("sliding_attention", {}).get("rope_theta", local_theta)
            rope = dict(rope["full_attention"])
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        window = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window"):
            window = None  # Qwen writes a sliding_window it does not use
        layer_types = cfg.get("layer_types")
        if arch == "gemma3" and layer_types is None:
            pattern = cfg.get("sliding_window_pattern", 6)
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                           for i in range(cfg["num_hidden_layers"])]
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
            tie_word_embeddings=cfg.get("tie_word_embeddings", arch == "gemma3"),
            rope_scaling=rope or None,
            architecture=arch,
            sliding_window=window or None,
            layer_types=tuple(layer_types) if layer_types is not None and window else None,
            rope_local_theta=(local_theta or 10000.0) if arch == "gemma3" else None,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256) if arch == "gemma3" else None,
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias")),
        )


def rope_inverse_frequencies(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim/2] (fp64), with the config's rope scaling applied
    (local: those of the sliding layers, which have a base of their own and no scaling: Gemma-3)."""
    dim = config.head_dim
    theta = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = None if local and config.rope_local_theta else config.rope_scaling
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
