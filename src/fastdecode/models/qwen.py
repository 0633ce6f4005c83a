"""Qwen2 / Qwen2.5 and Qwen3: Llama's block with one change each to the attention's inputs.

    Qwen2:  q, k, v = h @ W.T + b                      (biases on q, k and v)
    Qwen3:  q, k = rms_norm(q) * q_norm, rms_norm(k) * k_norm, per head, before the rotary
            embedding (QK-norm; no biases, and head_dim need not be hidden / heads)

Everything else (pre-norms, SwiGLU, rotary embedding, tied or untied head) is Llama's.
"""
from __future__ import annotations

import torch

from .decoder import take
from .llama import LlamaModel


class QwenModel(LlamaModel):
    def _parts(self, w: dict, prefix: str) -> dict:
        parts, attn = super()._parts(w, prefix), f"{prefix}.self_attn"
        if self.config.attention_bias:
            parts["qkv_bias"] = torch.cat([take(w, f"{attn}.{p}_proj.bias").float() for p in "qkv"])
        if self.config.architecture == "qwen3":
            parts["q_norm"], parts["k_norm"] = (self._norm(take(w, f"{attn}.{p}_norm.weight")) for p in "qk")
        return parts
