"""Gemma-3 (text): Llama's decoder with a norm on both sides of each sublayer.

    x = embed(tokens) * sqrt(hidden)                  (the factor rounded to the embedding's dtype)
    per layer:  h = rms_norm(x) * (1 + input_layernorm)
                q, k, v = h @ Wqkv.T;  q, k = rms_norm(q) * (1 + q_norm), ... per head (QK-norm)
                x = x + rms_norm(o(attention(rotary(q, k), v))) * (1 + post_attention_layernorm)
                h = rms_norm(x) * (1 + pre_feedforward_layernorm)
                x = x + rms_norm(down(gelu_tanh(gate(h)) * up(h))) * (1 + post_feedforward_layernorm)
    logits = head(rms_norm(x) * (1 + norm))           (the head is the embedding: tied, 262k tokens)

Attention is scaled by 1 / sqrt(query_pre_attn_scalar). Five of every six layers are local: they
attend to a sliding window of the last `sliding_window` positions and rotate with their own base
(rope_local_base_freq, 10k); the sixth is global (rope_theta, 1M). Norm weights are stored as
offsets from 1, as Hugging Face keeps them; 1 + w is formed once here, in float32 as transformers
forms it, and the shared kernel multiplies by it like any norm weight.
"""
from __future__ import annotations

import torch

from .decoder import DecoderLayer, DecoderModel, take


class Gemma3Model(DecoderModel):
    gelu = True

    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        return (1.0 + weight.float()).contiguous()

    def embed_scale(self) -> torch.Tensor:
        # transformers multiplies by sqrt(hidden) cast to the embedding's dtype (bfloat16: 25.25, not 25.30)
        dtype = torch.bfloat16 if self.embedding.kind == "bf16" else torch.float32
        return torch.tensor(self.config.hidden_size**0.5, dtype=dtype)

    def _layer(self, w: dict, prefix: str, index: int) -> DecoderLayer:
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        norm = lambda name: self._norm(take(w, f"{prefix}.{name}.weight"))  # noqa: E731
        return DecoderLayer(
            self.dtype, self._rotary(index), window=self.config.window(index),
            attn_norm=norm("input_layernorm"),
            qkv=[take(w, f"{attn}.{p}_proj.weight") for p in "qkv"],
            q_norm=norm("self_attn.q_norm"), k_norm=norm("self_attn.k_norm"),
            o=take(w, f"{attn}.o_proj.weight"),
            post_attn_norm=norm("post_attention_layernorm"),
            mlp_norm=norm("pre_feedforward_layernorm"),
            gate_up=[take(w, f"{mlp}.{p}_proj.weight") for p in ("gate", "up")],
            down=take(w, f"{mlp}.down_proj.weight"),
            post_mlp_norm=norm("post_feedforward_layernorm"),
        )
