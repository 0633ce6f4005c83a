"""LUD placeholders: what Lexical Unit Decoding trains, and the frozen target it trains them through.

Lexical Unit Decoding (Sun et al. 2024, "Decoding at the Speed of Thought: Harnessing Parallel
Decoding of Lexical Units for LLMs") lets the target itself guess the next few tokens in the same
forward: after the current token it reads k placeholder inputs, and the output at placeholder j
guesses the token j + 1 places after the current one. Here, as in Parallel Prompt Decoding
(Chen et al. 2024, "Hardware-Aware Parallel Prompt Decoding for Memory-Efficient Acceleration of
LLM Inference"), the target stays frozen and only what the placeholder rows read is trained: for
placeholder j and decoder layer l a vector shifts[j, l], added to the row's residual stream
before layer l (its stream starts at zero, so shifts[j, 0] is its input embedding; the later ones
make it a deep prompt). No other row is touched (models/segment.py), so verification stays exact.

Training (train/lud_data.py gives the batches): the target's own answers, with the context's keys
and values from the engine's forward; placeholder rows at sampled anchor positions attend to them
and to the chain's earlier placeholders, through a PyTorch replica of the target's layers
(FrozenTarget: the same dequantized weights, autograd-able; the native kernels have no backward).
The loss is the cross-entropy against the target's own next-token distribution at the position
each placeholder guesses, counted only inside lexical units: LUD's rule, consecutive tokens that
the target itself predicts with probability at least a threshold.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import chain_acceptance, soft_cross_entropy

PLACEHOLDERS = 3  # trained per file by default; the drafter may use fewer


class FrozenTarget:
    """The target's decoder layers as PyTorch operations on bfloat16 copies of its weights, for
    placeholder rows that attend to context keys and values computed by the engine."""

    def __init__(self, model):
        c = self.config = model.config
        self.layers = []
        for layer in model.layers:
            dense = {name: getattr(layer, name).dense().to(torch.bfloat16) for name in ("qkv", "o", "gate_up", "down")}
            self.layers.append((layer, dense))
        self.norm = model.norm
        self.head = model.lm_head.dense().to(torch.bfloat16)
        self.gelu = model.gelu
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.config.rms_norm_eps)

    def _attend(self, layer, q, keys, values, sees, positions, key_positions) -> torch.Tensor:
        """One sequence's placeholder rows q [r, heads, d] over its context's and their own keys and
        values [K + r, kv_heads, d]; sees [r, K + r] -> [r, heads * d]."""
        c, r = self.config, len(q)
        if layer.window:
            every = torch.cat([key_positions, positions])
            sees = sees & (every[None, :] > positions[:, None] - layer.window)
        group = c.num_heads // c.num_kv_heads
        k = keys.repeat_interleave(group, 1).transpose(0, 1)[None]
        v = values.repeat_interleave(group, 1).transpose(0, 1)[None]
        att = F.scaled_dot_product_attention(q.to(keys.dtype).transpose(0, 1)[None], k, v, attn_mask=sees,
                                             scale=c.attention_scale)
        return att[0].transpose(0, 1).reshape(r, self.q_size).float()

    def logits(self, shifts: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, key_positions: torch.Tensor, sees: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """Logits [R, vocab] of R placeholder rows, from several sequences.

        shifts [R, layers, H] added to their stream (zero at first) before each layer, positions [R];
        keys / values [layers, K, kv_heads, d]: the contexts' (keys after the rotary embedding), in the
        cache's dtype; key_positions [K]; spans [S, 4]: each sequence's placeholder rows r0:r1 and
        context rows c0:c1; sees [R, K + R]: which context rows, then which placeholder rows, each
        row sees, where only its own sequence's columns matter."""
        c, d = self.config, self.config.head_dim
        R, K = len(shifts), keys.shape[1]
        if not R:
            return shifts.new_zeros(0, self.head.shape[0]) + shifts.sum() * 0  # a batch without units: no loss, no step

        parts = [(r0, r1, c0, c1, torch.cat([sees[r0:r1, c0:c1], sees[r0:r1, K + r0 : K + r1]], 1))
                 for r0, r1, c0, c1 in spans.tolist() if r1 > r0]
        x = torch.zeros_like(shifts[:, 0])
        for i, (layer, w) in enumerate(self.layers):
            x = x + shifts[:, i]
            qkv = self._norm(x, layer.attn_norm).to(torch.bfloat16) @ w["qkv"].T
            qkv = qkv.float() if layer.qkv_bias is None else qkv.float() + layer.qkv_bias
            q = qkv[:, : self.q_size].view(R, c.num_heads, d)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(R, c.num_kv_heads, d)
            v = qkv[:, self.q_size + self.kv_size :].view(R, c.num_kv_heads, d)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            cos, sin = layer.rotary.cos[positions, None], layer.rotary.sin_signed[positions, None]
            q = q * cos + q.roll(d // 2, -1) * sin
            k = k * cos + k.roll(d // 2, -1) * sin
            att = torch.cat([self._attend(layer, q[r0:r1], torch.cat([keys[i, c0:c1], k[r0:r1].to(keys.dtype)]),
                                          torch.cat([values[i, c0:c1], v[r0:r1].to(values.dtype)]),
                                          mask, positions[r0:r1], key_positions[c0:c1])
                             for r0, r1, c0, c1, mask in parts])
            o = (att.to(torch.bfloat16) @ w["o"].T).float()
            x = x + (o if layer.post_attn_norm is None else self._norm(o, layer.post_attn_norm))
            gate, up = (self._norm(x, layer.mlp_norm).to(torch.bfloat16) @ w["gate_up"].T).float().chunk(2, -1)
            act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
            y = ((act * up).to(torch.bfloat16) @ w["down"].T).float()
            x = x + (y if layer.post_mlp_norm is None else self._norm(y, layer.post_mlp_norm))
        return (self._norm(x, self.norm).to(torch.bfloat16) @ self.head.T).float()


class Placeholders(nn.Module):
    """shifts [k, layers, hidden]: what placeholder j's residual stream gets before each layer."""

    kind = "lud"
    layers: tuple[int, ...] = ()  # reads no stored states: the loop's batches come from train/lud_data.py
    train_layers: tuple[int, ...] = ()

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg, kind=self.kind)
        self.shifts = nn.Parameter(torch.zeros(cfg["placeholders"], cfg["num_layers"], cfg["hidden_size"]))
        self._model, self._target = None, None

    @classmethod
    def from_target(cls, model, draft_ids=None, placeholders: int = PLACEHOLDERS, threshold: float = 0.5):
        """Placeholders that start as the target's mean token embedding (the draft vocabulary is the
        target's whole one: placeholder rows end in the target's own output head)."""
        c = model.config
        head = cls(dict(hidden_size=c.hidden_size, vocab_size=c.vocab_size, num_layers=c.num_layers,
                        placeholders=placeholders, threshold=threshold))
        with torch.no_grad():
            head.shifts[:, 0] = model.embed_tokens(torch.arange(c.vocab_size)).float().mean(0)
        head.attach(model)
        return head

    def attach(self, model) -> None:
        self._model, self._target = model, None

    @property
    def target(self) -> FrozenTarget:
        """Built when training first needs it: drafting reads only the shifts."""
        if self._target is None:
            self._target = FrozenTarget(self._model)
        return self._target

    def config(self) -> dict:
        return dict(self.cfg)

    @property
    def count(self) -> int:
        return self.cfg["placeholders"]

    def _logits(self, batch: dict) -> torch.Tensor:
        """Logits [anchors, k, vocab] of every anchor's placeholder chain."""
        n, k = batch["anchors"].shape[0], self.count
        shifts = self.shifts.float()[None].expand(n, -1, -1, -1).reshape(n * k, *self.shifts.shape[1:])
        positions = (batch["anchors"][:, None] + torch.arange(1, k + 1)).flatten()
        logits = self.target.logits(shifts, positions, batch["keys"], batch["values"], batch["key_positions"],
                                    batch["sees"], batch["spans"])
        return logits.view(n, k, self.cfg["vocab_size"])

    def loss(self, batch: dict):
        """Soft cross-entropy against the target's own distribution, inside lexical units only."""
        logits, mask = self._logits(batch), batch["mask"]
        ce = [soft_cross_entropy(logits[:, j][mask[:, j]], batch["top_ids"][:, j][mask[:, j]],
                                 batch["top_probs"][:, j][mask[:, j]]) for j in range(self.count)]
        counts = mask.sum(0).float()
        total = sum(c * n for c, n in zip(ce, counts)) / counts.sum().clamp(min=1)
        return total, {f"loss@{j + 1}": float(c.detach()) for j, c in enumerate(ce)}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        """Greedy chain acceptance of the guesses at every anchor (units or not): placeholder j's
        argmax against the target's argmax at the position it guesses."""
        guess = self._logits(batch).argmax(-1)
        best = batch["top_ids"][..., 0]
        return chain_acceptance([guess[:, j] == best[:, j] for j in range(self.count)],
                                [batch["valid"][:, j] for j in range(self.count)])
