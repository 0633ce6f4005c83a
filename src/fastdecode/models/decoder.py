"""The decoder every family shares: embedding, N decoder layers, final norm, output head.

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
allows (ancestor-or-self for a draft tree; causal when mask is None), within the layer's sliding
window if it has one. Positions are explicit, so tree nodes at the same depth share a rotary
position. `layers` runs only a subset of decoder layers (self-speculation); only those layers'
cache rows are written. `head` replaces the output head (a partial_head over part of the
vocabulary, for drafting).

A forward is: the embedding rows (float32: the residual stream), one native call per decoder
layer (kernels/layer.c: norms, products, rotary embedding, cache writes, attention, activation and
residuals in one OpenMP region), the final norm and the head. The weights stay in the format
they were loaded in (models/quant.py: the GGUF file's own blocks, bfloat16 or float32); `dtype`
is the activations' dtype, that of the products' inputs and of the KV cache, while sums, the
residual stream, rotary embeddings and attention are float32. Every kernel gives a token a result
that does not depend on the other tokens in the forward: a token's logits are bitwise the same
alone, in a chain or in a draft tree, which keeps speculative decoding exactly equal to plain
decoding. Without a C compiler the same layer runs as PyTorch operations (not batch-invariant).

A family (llama.py, gemma3.py, qwen.py) says which weights make up its layers (`_layer`), how its
norm weights multiply (`_norm`) and how it scales its embeddings; the layer itself is one for all,
its options set per layer (DecoderLayer).
"""
from __future__ import annotations

import ctypes
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import FastDecodeError
from ..kernels import Dims, LayerWeights, Step, matrix, matrix_rows, native_lib, rms_norm
from ..runtime.kv_cache import BLOCK_ROWS, KVCache, KVPool
from .config import ModelConfig, rope_inverse_frequencies
from .linear import Linear
from .quant import PackedMatrix, pack_dense
from .segment import Segment


def packed(w: torch.Tensor | PackedMatrix) -> PackedMatrix:
    """A dense float tensor is kept in its own dtype (float32, or bfloat16)."""
    if isinstance(w, PackedMatrix):
        return w
    return pack_dense(w if w.dtype == torch.bfloat16 else w.float())


def take(weights: dict, name: str):
    """Pop a tensor, naming it when the checkpoint lacks it."""
    try:
        return weights.pop(name)
    except KeyError:
        raise FastDecodeError(f"the checkpoint has no tensor {name!r} (a missing or misnamed weight)") from None


class Rotary:
    """Rotary tables [max_positions, head_dim] float32, as Hugging Face computes them.
    rotate_half(x) * sin == cat(x2, x1) * sin_signed, with the first half of sin negated."""

    def __init__(self, config: ModelConfig, local: bool = False):
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float64)
        angles = torch.outer(positions, rope_inverse_frequencies(config, local))
        angles = torch.cat([angles, angles], dim=-1).float()
        sin = angles.sin()
        sin[:, : config.head_dim // 2] *= -1
        self.cos, self.sin_signed = angles.cos().contiguous(), sin.contiguous()


class DecoderLayer:
    """One decoder layer's weights and options (kernels/layer.c LayerWeights). Norm weights are
    float32 and multiplicative (a family whose norms scale by 1 + w passes 1 + w); the options a
    family lacks stay None (window 0: global attention)."""

    def __init__(self, dtype: torch.dtype, rotary: Rotary, *, attn_norm, qkv, o, mlp_norm, gate_up, down,
                 qkv_bias=None, q_norm=None, k_norm=None, post_attn_norm=None, post_mlp_norm=None, window: int = 0):
        f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
        self.attn_norm, self.mlp_norm = f32(attn_norm), f32(mlp_norm)
        self.qkv_bias, self.q_norm, self.k_norm = f32(qkv_bias), f32(q_norm), f32(k_norm)
        self.post_attn_norm, self.post_mlp_norm = f32(post_attn_norm), f32(post_mlp_norm)
        self.rotary, self.window = rotary, window
        self.qkv = Linear([packed(w) for w in qkv], dtype)
        self.o = Linear([packed(o)], dtype)
        self.gate_up = Linear([packed(w) for w in gate_up], dtype)
        self.down = Linear([packed(down)], dtype)
        if self.qkv.native is not None:  # the kernel's view of the layer, built once
            ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
            self.weights = LayerWeights(
                ptr(self.attn_norm), ptr(self.mlp_norm), self.qkv.product(), self.o.product(),
                self.gate_up.product(), self.down.product(), ptr(self.qkv_bias), ptr(self.q_norm),
                ptr(self.k_norm), ptr(self.post_attn_norm), ptr(self.post_mlp_norm),
                rotary.cos.data_ptr(), rotary.sin_signed.data_ptr(), window)


class _Rows:
    """The rows of one forward: the segments' tokens and positions stacked, the cache slot of each
    row, and the attention kernel's description of the sequences (kernels/attention.c)."""

    def __init__(self, segments: Sequence[Segment]):
        self.pool = segments[0].cache.pool
        self.spans, total = [], 0  # (segment, first row, start in its cache)
        for seg in segments:
            if seg.cache.pool is not self.pool:
                raise ValueError("the segments of one forward must share a KV pool")
            seg.cache.check_room(len(seg.tokens))
            self.spans.append((seg, total, seg.cache.length))
            total += len(seg.tokens)
        self.total = total
        one = len(segments) == 1
        self.tokens = segments[0].tokens if one else torch.cat([seg.tokens for seg in segments])
        self.positions = (segments[0].positions if one else torch.cat([seg.positions for seg in segments])).long().contiguous()
        slots = [seg.cache.slots(start, len(seg.tokens)) for seg, _, start in self.spans]
        self.blocks = (slots[0][0] if one else torch.cat([b for b, _ in slots])).contiguous()
        self.offsets = (slots[0][1] if one else torch.cat([o for _, o in slots])).contiguous()
        meta, tables, masks, table_at, mask_at = [], [], [], 0, 0
        for seg, row, start in self.spans:
            n = len(seg.tokens)
            meta.append([row, n, start, table_at, -1 if seg.mask is None else mask_at])
            tables.append(seg.cache.table)
            table_at += len(seg.cache.table)
            if seg.mask is not None:
                masks.append(seg.mask.to(torch.uint8).flatten())
                mask_at += n * n
        self.meta = torch.tensor(meta, dtype=torch.long)
        self.prompt = None  # uint8 [rows]: 1 for a prompt row, when there are any
        if any(seg.prompt_rows for seg in segments):
            self.prompt = torch.cat([(torch.arange(len(seg.tokens)) < seg.prompt_rows).to(torch.uint8) for seg in segments])
        self.tables = torch.cat(tables) if len(tables) > 1 else tables[0]
        self.masks = torch.cat(masks) if masks else None


class DecoderModel:
    """The shared decoder (models/contract.CausalLM). Subclasses: _layer, and _norm / embed_scale
    where the family differs from Llama."""
    gelu = False  # the MLP's gate activation: SiLU (SwiGLU), or GELU with the tanh approximation (GeGLU)

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor | PackedMatrix], dtype: torch.dtype):
        """weights: Hugging Face names; dense tensors (float32 or bfloat16, kept in their dtype) or
        PackedMatrix (models/quant.py); consumed. dtype: the activations' and the KV cache's dtype."""
        self.config = config
        self.dtype = dtype
        c = config
        self.native = native_lib()
        self.embedding = packed(take(weights, "model.embed_tokens.weight"))
        self.embedding_matrix = matrix(self.embedding) if self.native is not None else None
        self.rotary = {local: Rotary(c, local) for local in {bool(c.rope_local_theta and c.window(i)) for i in range(c.num_layers)}}
        self.layers = [self._layer(weights, f"model.layers.{i}", i) for i in range(c.num_layers)]
        self.norm = self._norm(take(weights, "model.norm.weight"))
        self.head_matrix = self.embedding if c.tie_word_embeddings else packed(take(weights, "lm_head.weight"))
        self.lm_head = Linear([self.head_matrix], dtype)
        layer_sources = {s for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
                         for s in lin.sources}
        # what the matrices are stored as, e.g. "Q4_1+Q8_0" (the cost curve is kept per format)
        self.weight_format = "+".join(sorted(layer_sources | {self.head_matrix.source}))
        # Whether a prompt's rows take another path through the products than other rows (AMX tiles
        # for prompts only with FASTDECODE_AMX=prompts, kernels/matmul.c; never for float32
        # weights): each row's result is still independent of its neighbours, but a token computed
        # as a prompt row is not bitwise the same token computed as a generated one. Fixed for the
        # process, so found once here.
        self.prompt_rows_differ = (self.native is not None and dtype == torch.bfloat16
                                   and layer_sources != {"float32"} and self.native.kernel_amx() == 1)
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.group = c.num_heads // c.num_kv_heads
        self.scale = c.attention_scale
        self.dims = Dims(c.hidden_size, self.q_size, self.kv_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                         c.head_dim, BLOCK_ROWS.bit_length() - 1, c.rms_norm_eps, self.scale,
                         int(dtype == torch.bfloat16), int(self.gelu))

    # --- what a family defines ---------------------------------------------------------------

    def _layer(self, w: dict, prefix: str, index: int) -> DecoderLayer:
        raise NotImplementedError

    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        """A norm's multiplicative weight, float32 (Llama: the weight itself)."""
        return weight.float().contiguous()

    def _rotary(self, index: int) -> Rotary:
        c = self.config
        return self.rotary[bool(c.rope_local_theta and c.window(index))]

    def embed_scale(self) -> torch.Tensor | None:
        """A factor on the embedding rows, or None (Llama)."""
        return None

    # --- the contract ----------------------------------------------------------------------------

    @property
    def embed(self) -> torch.Tensor:
        """The whole embedding, dequantized: float32 [vocab, hidden] (a copy; embed_tokens reads rows)."""
        return self.embedding.dequantize()

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's first value [n, hidden] float32: embedding rows, dequantized and
        scaled where the family scales them (trained drafters read them too)."""
        if self.native is None:
            rows = self.embedding.rows(token_ids)
        else:
            rows = matrix_rows(self.native, self.embedding, self.embedding_matrix, token_ids)
        scale = self.embed_scale()
        return rows if scale is None else (rows.to(scale.dtype) * scale).float()

    def head_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows [n, hidden] float32 of the output head, dequantized (a draft head starts from them)."""
        return self.head_matrix.rows(token_ids)

    def partial_head(self, token_ids: torch.Tensor) -> Linear:
        """An output head over only these tokens (logit j is token_ids[j]): a cheaper head for drafting."""
        return Linear([self.head_matrix.select(token_ids)], self.dtype)

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
        """Logits [rows, vocab] of every segment's rows in order (only its last row, and its placeholder
        rows, when last_only),
        and each capturing segment's `hidden`. Every kernel treats rows independently and each
        segment attends only to its own cache, so a segment's results are bitwise those of
        forward() on it alone."""
        c = self.config
        rows = _Rows(segments)
        run_layer = _NativeLayers(self, rows) if self.native is not None else self._torch_layers(rows)
        x = self.embed_tokens(rows.tokens)  # float32 [rows, hidden]: the residual stream
        shifted = []  # LUD's rows (segment.py): their part of x, and what each layer adds to it
        for seg, row, _ in rows.spans:
            if seg.placeholders is not None:
                first = row + len(seg.tokens) - seg.placeholder_rows
                shifted.append((x[first : first + seg.placeholder_rows], seg.placeholders.unbind(1)))
                shifted[-1][0].zero_()
        captured = {i: None for seg in segments for i in seg.capture}
        for i in range(c.num_layers) if layers is None else layers:
            for placeholder_rows, shifts in shifted:
                placeholder_rows += shifts[i]
            run_layer(i, x)  # x updated in place
            if i in captured:
                captured[i] = x.clone()
        for seg, row, _ in rows.spans:
            if seg.capture:
                seg.hidden = torch.stack([captured[i][row : row + len(seg.tokens)] for i in seg.capture], dim=1)
        if any(seg.last_only for seg in segments):
            x = x[[r for seg, row, _ in rows.spans
                   for r in (range(row + len(seg.tokens) - 1 - seg.placeholder_rows, row + len(seg.tokens)) if seg.last_only
                             else range(row, row + len(seg.tokens)))]]
        if self.native is not None:
            hidden = rms_norm(self.native, x.contiguous(), self.norm, c.rms_norm_eps, self.dtype)
        else:
            hidden = F.rms_norm(x, (c.hidden_size,), self.norm, c.rms_norm_eps).to(self.dtype)
        return (head or self.lm_head)(hidden)

    # --- the PyTorch fallback ------------------------------------------------------------------

    def _torch_layers(self, rows: _Rows):
        """run(layer, x): the same layer as PyTorch operations (without a compiler; not batch-invariant)."""
        c, n, pool = self.config, rows.total, rows.pool
        half, d = c.head_dim // 2, c.head_dim
        attend = self._attend_torch(rows.spans)
        act = (lambda g: F.gelu(g, approximate="tanh")) if self.gelu else F.silu

        def norm(x: torch.Tensor, weight: torch.Tensor, dtype=self.dtype) -> torch.Tensor:
            return F.rms_norm(x, (x.shape[-1],), weight, c.rms_norm_eps).to(dtype)

        def residual(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor | None) -> None:
            x += y if post is None else norm(y, post, torch.float32)

        def run(i: int, x: torch.Tensor) -> None:
            layer = self.layers[i]
            cos = layer.rotary.cos[rows.positions].unsqueeze(1)
            sin = layer.rotary.sin_signed[rows.positions].unsqueeze(1)
            qkv = layer.qkv(norm(x, layer.attn_norm))
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            qk = qkv[:, : self.q_size + self.kv_size].view(n, c.num_heads + c.num_kv_heads, d)
            if layer.q_norm is not None:
                qk = torch.cat([norm(qk[:, : c.num_heads], layer.q_norm, torch.float32),
                                norm(qk[:, c.num_heads :], layer.k_norm, torch.float32)], dim=1)
            qk = qk * cos + torch.cat([qk[..., half:], qk[..., :half]], dim=-1) * sin
            pool.k[i, rows.blocks, :, :, rows.offsets] = qk[:, c.num_heads :].to(self.dtype)
            pool.v[i, rows.blocks, :, rows.offsets] = qkv[:, self.q_size + self.kv_size :].view(n, c.num_kv_heads, d).to(self.dtype)
            residual(x, layer.o(attend(i, qk[:, : c.num_heads]).to(self.dtype)), layer.post_attn_norm)
            gate, up = layer.gate_up(norm(x, layer.mlp_norm)).split(c.intermediate_size, dim=-1)
            residual(x, layer.down((act(gate) * up).to(self.dtype)), layer.post_mlp_norm)
        return run

    def _attend_torch(self, spans):
        """attend(layer, q [rows, heads, d] float32) -> [rows, q_size] float32 with PyTorch's fused attention."""
        c = self.config
        windows = sorted({layer.window for layer in self.layers})
        masks = [{w: self._attention_mask(seg, start, w) for w in windows} for seg, _, start in spans]

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            outs = []
            for (seg, row, start), mask in zip(spans, masks):
                n = len(seg.tokens)
                # [n, heads, d] -> [kv_heads, group * n, d]: each kv head attends for its whole group.
                qs = q[row : row + n].reshape(n, c.num_kv_heads, self.group, c.head_dim)
                qs = qs.permute(1, 2, 0, 3).reshape(1, c.num_kv_heads, self.group * n, c.head_dim)
                keys = seg.cache.keys(layer, start + n).transpose(-1, -2).unsqueeze(0).float()
                values = seg.cache.values(layer, start + n).unsqueeze(0).float()
                # 4-d inputs take PyTorch's fused CPU attention kernel; 3-d ones a slower generic path.
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask[self.layers[layer].window],
                                                   scale=self.scale)
                outs.append(o.view(c.num_kv_heads, self.group, n, c.head_dim).permute(2, 0, 1, 3).reshape(n, self.q_size))
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        return attend

    def _attention_mask(self, seg: Segment, start: int, window: int) -> torch.Tensor | None:
        """Boolean [group * n, start + n] (True = attend), or None when one token sees everything."""
        n = len(seg.tokens)
        if seg.mask is None:
            if n == 1 and (not window or start < window):
                return None
            full = torch.ones(n, start + n, dtype=torch.bool).tril(start)
        else:
            full = torch.cat([torch.ones(n, start, dtype=torch.bool), seg.mask], dim=1)
        if window:  # keys at positions > p - window; committed row j is at position j
            key_positions = torch.cat([torch.arange(start), seg.positions.long()])
            full &= key_positions[None, :] > seg.positions.long()[:, None] - window
        return full.repeat(self.group, 1)


class _NativeLayers:
    """run(layer, x): kernels/layer.c's decoder_layer over one forward's rows. The step it passes
    holds their positions, cache slots and attention plan, and scratch space for every phase."""

    def __init__(self, model: DecoderModel, rows: _Rows):
        c, n = model.config, rows.total
        widest = -(-max(c.hidden_size, model.q_size, c.intermediate_size) // 32) * 32
        self.scratch = [torch.empty(n, widest, dtype=model.dtype), torch.empty(n, model.native.row_prep_floats(widest)),
                        torch.empty(n, model.q_size + 2 * model.kv_size), torch.empty(n, model.q_size),
                        torch.empty(n, 2 * c.intermediate_size), torch.empty(n, c.hidden_size)]  # h, its prep (kernels.h prep_floats), qkv, att, gu, y
        self.rows = rows
        self.step = Step(n, rows.positions.data_ptr(), rows.blocks.data_ptr(), rows.offsets.data_ptr(),
                         len(rows.meta), rows.meta.data_ptr(), rows.tables.data_ptr(),
                         None if rows.masks is None else rows.masks.data_ptr(), *(t.data_ptr() for t in self.scratch),
                         None if rows.prompt is None else rows.prompt.data_ptr())
        self.model = model
        k, v = rows.pool.k, rows.pool.v  # [layers, ...]: layer i's pool starts i * stride(0) elements on
        self.k, self.v = k.data_ptr(), v.data_ptr()
        self.k_layer, self.v_layer = k.stride(0) * k.element_size(), v.stride(0) * v.element_size()

    def __call__(self, i: int, x: torch.Tensor) -> None:
        m = self.model
        m.native.decoder_layer(ctypes.byref(m.dims), ctypes.byref(m.layers[i].weights), ctypes.byref(self.step),
                               self.k + i * self.k_layer, self.v + i * self.v_layer, x.data_ptr())
