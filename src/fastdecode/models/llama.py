"""The native Llama-family transformer, written for a lean decode step of one or many sequences.

forward(tokens [n], positions [n], cache, mask [n, n] | None, layers | None, capture)
    -> logits [n, vocab] float32 (and, when `capture` names layers, their states [n, k, hidden])
forward_batch([Segment(tokens, positions, cache, mask, last_only, capture), ...], ...)
    -> the same for several sequences in one pass: their rows are stacked (no padding) through the
       matrix products, and each attends only to its own cache. forward is its one-sequence case.
       A segment that names layers in `capture` gets their states in `segment.hidden`: the
       residual stream after each of those decoder layers (0-based), for every one of its rows
       (also when only its last row's logits are wanted). Trained drafters read them (EAGLE reads
       a low, a middle and a high layer), so the verify forward hands them over at no extra pass.

The n new tokens attend to every committed cache row and, among themselves, to what `mask`
allows (ancestor-or-self for a draft tree; causal when mask is None). Positions are explicit, so
tree nodes at the same depth share a rotary position. `layers` runs only a subset of decoder
layers (self-speculation); only those layers' cache rows are written. `head` replaces the output
head (a partial_head over part of the vocabulary, for drafting).

Per decode step the hot path is about twenty tensor ops per layer: q, k and v come out of one
fused projection and get their rotary embedding together, and gate and up share one projection.
The matrix products and attention run on kernels (kernels/) whose result for a token does not
depend on the other tokens in the forward: a token's logits are bitwise the same alone, in a
chain or in a draft tree, which keeps speculative decoding exactly equal to plain decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..kernels import attention, native_lib
from ..runtime.kv_cache import KVCache, KVPool
from .config import ModelConfig, rope_inverse_frequencies
from .linear import Linear


@dataclass
class Segment:
    """One sequence's rows in a batched forward: tokens [n], positions [n], its own cache, and
    mask [n, n] (ancestor-or-self among the new rows) or None for causal."""
    tokens: torch.Tensor
    positions: torch.Tensor
    cache: KVCache
    mask: torch.Tensor | None = None
    last_only: bool = False  # logits of its last row only (a prefill chunk)
    capture: tuple[int, ...] = ()  # decoder layers whose output states this segment wants
    hidden: torch.Tensor | None = None  # set by the forward: [n, len(capture), hidden_size] float32


class _Layer:
    def __init__(self, w: dict[str, torch.Tensor], prefix: str):
        self.attn_norm = w[f"{prefix}.input_layernorm.weight"]
        self.mlp_norm = w[f"{prefix}.post_attention_layernorm.weight"]
        self.qkv = Linear(torch.cat([w.pop(f"{prefix}.self_attn.{p}_proj.weight") for p in "qkv"]))
        self.o = Linear(w.pop(f"{prefix}.self_attn.o_proj.weight"))
        self.gate_up = Linear(torch.cat([w.pop(f"{prefix}.mlp.{p}_proj.weight") for p in ("gate", "up")]))
        self.down = Linear(w.pop(f"{prefix}.mlp.down_proj.weight"))


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype):
        """weights: Hugging Face names, already in `dtype`; consumed (packed copies replace them)."""
        self.config = config
        self.dtype = dtype
        c = config
        self.embed = weights["model.embed_tokens.weight"]
        self.layers = [_Layer(weights, f"model.layers.{i}") for i in range(c.num_layers)]
        self.norm = weights["model.norm.weight"]
        self.head_weight = self.embed if c.tie_word_embeddings else weights.pop("lm_head.weight")
        self.lm_head = Linear(self.head_weight)
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.group = c.num_heads // c.num_kv_heads
        self.scale = c.head_dim**-0.5
        # Rotary tables [max_positions, head_dim] in the model dtype, as Hugging Face computes them.
        angles = torch.outer(torch.arange(c.max_position_embeddings, dtype=torch.float64), rope_inverse_frequencies(c))
        angles = torch.cat([angles, angles], dim=-1).float()
        # rotate_half(x) * sin == cat(x2, x1) * sin_signed, with the first half of sin negated.
        sin = angles.sin()
        sin[:, : c.head_dim // 2] *= -1
        self.cos, self.sin_signed = angles.cos().to(dtype), sin.to(dtype)
        self.native = native_lib()

    def partial_head(self, token_ids: torch.Tensor) -> Linear:
        """An output head over only these tokens (logit j is token_ids[j]): a cheaper head for drafting."""
        return Linear(self.head_weight[token_ids])

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows [n, hidden] float32 (trained drafters read them)."""
        return self.embed[token_ids].float()

    def head_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows [n, hidden] float32 of the output head (a draft head starts from them)."""
        return self.head_weight[token_ids].float()

    def new_pool(self, budget_bytes: int | None = None, rows: int = 0) -> KVPool:
        """A KV pool for this model: `budget_bytes` of blocks, fixed; else room for `rows`, growing."""
        c = self.config
        return KVPool(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype, rows, budget_bytes)

    def new_cache(self, capacity: int) -> KVCache:
        """A cache of up to `capacity` rows in a pool of its own."""
        return KVCache(self.new_pool(rows=capacity), capacity)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor | None = None,
        layers: Sequence[int] | None = None,
        last_logits_only: bool = False,
        head: Linear | None = None,
        capture: Sequence[int] = (),
    ):
        segment = Segment(tokens, positions, cache, mask, last_logits_only, tuple(capture))
        logits = self.forward_batch([segment], layers, head)
        return (logits, segment.hidden) if capture else logits

    @torch.inference_mode()
    def forward_batch(
        self,
        segments: Sequence[Segment],
        layers: Sequence[int] | None = None,
        head: Linear | None = None,
    ):
        """Logits [rows, vocab] of every segment's rows in order (only its last row when last_only),
        and each capturing segment's `hidden`. Every kernel treats rows independently and each
        segment attends only to its own cache, so a segment's results are bitwise those of
        forward() on it alone."""
        c = self.config
        half = c.head_dim // 2
        pool = segments[0].cache.pool
        spans, total = [], 0  # (segment, first row, start in its cache)
        for seg in segments:
            if seg.cache.pool is not pool:
                raise ValueError("the segments of one forward must share a KV pool")
            seg.cache.check_room(len(seg.tokens))
            spans.append((seg, total, seg.cache.length))
            total += len(seg.tokens)
        one = len(segments) == 1
        tokens = segments[0].tokens if one else torch.cat([seg.tokens for seg in segments])
        positions = segments[0].positions if one else torch.cat([seg.positions for seg in segments])
        cos = self.cos[positions].unsqueeze(1)  # [rows, 1, head_dim]
        sin = self.sin_signed[positions].unsqueeze(1)
        # Where each new row's key and value go: (block, offset) in the pool.
        slots = [seg.cache.slots(start, len(seg.tokens)) for seg, _, start in spans]
        blocks = slots[0][0] if one else torch.cat([b for b, _ in slots])
        offsets = slots[0][1] if one else torch.cat([o for _, o in slots])
        attend = self._attend_native(spans) if self.native is not None else self._attend_torch(spans)
        x = F.embedding(tokens, self.embed)  # [rows, hidden]
        captured = {i: None for seg in segments for i in seg.capture}
        for i in range(c.num_layers) if layers is None else layers:
            layer = self.layers[i]
            h = F.rms_norm(x, (c.hidden_size,), layer.attn_norm, c.rms_norm_eps)
            qkv = layer.qkv(h)
            qk = qkv[:, : self.q_size + self.kv_size].view(total, c.num_heads + c.num_kv_heads, c.head_dim)
            qk = torch.addcmul(qk * cos, torch.cat([qk[..., half:], qk[..., :half]], dim=-1), sin)
            pool.k[i, blocks, :, :, offsets] = qk[:, c.num_heads :]
            pool.v[i, blocks, :, offsets] = qkv[:, self.q_size + self.kv_size :].view(total, c.num_kv_heads, c.head_dim)
            x += layer.o(attend(i, qk[:, : c.num_heads]))
            h = F.rms_norm(x, (c.hidden_size,), layer.mlp_norm, c.rms_norm_eps)
            gate, up = layer.gate_up(h).split(c.intermediate_size, dim=-1)
            x += layer.down(F.silu(gate).mul_(up))
            if i in captured:
                captured[i] = x.float()  # a copy: x is updated in place by the next layer
        for seg, row, _ in spans:
            if seg.capture:
                seg.hidden = torch.stack([captured[i][row : row + len(seg.tokens)] for i in seg.capture], dim=1)
        if any(seg.last_only for seg in segments):
            x = x[[r for seg, row, _ in spans
                   for r in (range(row + len(seg.tokens) - 1, row + len(seg.tokens)) if seg.last_only
                             else range(row, row + len(seg.tokens)))]]
        hidden = F.rms_norm(x, (c.hidden_size,), self.norm, c.rms_norm_eps)
        return (head or self.lm_head)(hidden).float()

    def _attend_native(self, spans):
        """attend(layer, q [rows, heads, d]) -> [rows, q_size]: every segment over its own paged
        cache, in one kernel call per layer (kernels/attention.c)."""
        meta, tables, masks, table_at, mask_at = [], [], [], 0, 0
        for seg, row, start in spans:
            n = len(seg.tokens)
            meta.append([row, n, start, table_at, -1 if seg.mask is None else mask_at])
            tables.append(seg.cache.table)
            table_at += len(seg.cache.table)
            if seg.mask is not None:
                masks.append(seg.mask.to(torch.uint8).flatten())
                mask_at += n * n
        meta = torch.tensor(meta, dtype=torch.long)
        tables = torch.cat(tables) if len(tables) > 1 else tables[0]
        masks = torch.cat(masks) if masks else None
        pool = spans[0][0].cache.pool

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            o = attention(self.native, q.float().contiguous(), pool.k[layer], pool.v[layer], meta, tables, masks, self.scale)
            return o.to(self.dtype).view(len(q), self.q_size)
        return attend

    def _attend_torch(self, spans):
        """The same with PyTorch's fused attention (without a compiler): fast, but not batch-invariant."""
        c = self.config
        masks = [self._attention_mask(len(seg.tokens), start, seg.mask) for seg, _, start in spans]

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            outs = []
            for (seg, row, start), mask in zip(spans, masks):
                n = len(seg.tokens)
                # [n, heads, d] -> [kv_heads, group * n, d]: each kv head attends for its whole group.
                qs = q[row : row + n].reshape(n, c.num_kv_heads, self.group, c.head_dim)
                qs = qs.permute(1, 2, 0, 3).reshape(1, c.num_kv_heads, self.group * n, c.head_dim)
                keys = seg.cache.keys(layer, start + n).transpose(-1, -2).unsqueeze(0)
                values = seg.cache.values(layer, start + n).unsqueeze(0)
                # 4-d inputs take PyTorch's fused CPU attention kernel; 3-d ones a slower generic path.
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=self.scale)
                outs.append(o.view(c.num_kv_heads, self.group, n, c.head_dim).permute(2, 0, 1, 3).reshape(n, self.q_size))
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        return attend

    def _attention_mask(self, n: int, start: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean [group * n, start + n] (True = attend), or None when one token sees everything."""
        if mask is None:
            if n == 1:
                return None
            full = torch.ones(n, start + n, dtype=torch.bool).tril(start)
        else:
            full = torch.cat([torch.ones(n, start, dtype=torch.bool), mask], dim=1)
        return full.repeat(self.group, 1)
