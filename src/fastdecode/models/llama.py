"""Llama (and Mistral, which is Llama with its own defaults and an optional sliding window):

    x = embed(tokens)
    per layer:  x = x + o(attention(rotary(q, k), v)),  q, k, v = h @ Wqkv.T,  h = rms_norm(x) * input_layernorm
                x = x + down(silu(gate(h)) * up(h)),    h = rms_norm(x) * post_attention_layernorm
    logits = head(rms_norm(x) * norm)

The shared decoder (models/decoder.py) runs it; this file says which weights are which.
"""
from __future__ import annotations

from .decoder import DecoderLayer, DecoderModel, take
from .segment import Segment  # noqa: F401  (the batch contract, long imported from here)


class LlamaModel(DecoderModel):
    def _layer(self, w: dict, prefix: str, index: int) -> DecoderLayer:
        return DecoderLayer(self.dtype, self._rotary(index), window=self.config.window(index),
                            **self._parts(w, prefix))

    def _parts(self, w: dict, prefix: str) -> dict:
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        return dict(
            attn_norm=self._norm(take(w, f"{prefix}.input_layernorm.weight")),
            qkv=[take(w, f"{attn}.{p}_proj.weight") for p in "qkv"],
            o=take(w, f"{attn}.o_proj.weight"),
            mlp_norm=self._norm(take(w, f"{prefix}.post_attention_layernorm.weight")),
            gate_up=[take(w, f"{mlp}.{p}_proj.weight") for p in ("gate", "up")],
            down=take(w, f"{mlp}.down_proj.weight"),
        )
