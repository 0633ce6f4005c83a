"""Weight matrices in the kernels' packed layouts (kernels/kernels.h), made from GGUF blocks or tensors.

A GGUF quantized tensor is rows of blocks: 32 weights (256 for the K-quants) stored as small
integers with a float16 scale (and minimum). `from_gguf` decodes those integers and scales
exactly, with integer operations on the raw bytes (never through float32 matrices), and packs
them so that the kernel reads 16 output rows as one stream. Every format maps to one of two
kernel layouts: 4-bit (Q4_0, Q4_1, Q4_K) or 8-bit (Q8_0, and Q5_0 and Q6_K widened to 8 bits:
the same values in one more bit per weight, so one kernel serves them). `quantize_q8_0` makes
the same 8-bit layout from float weights (llama.cpp's Q8_0 rounding), for models without a file
of their own formats. `pack_dense` keeps float32 or bfloat16 weights as they are.

A packed matrix can still hand out rows (`rows`: the embedding lookup, dequantized) and make a
matrix of some of its rows (`select`: a partial output head), so one copy of a tied embedding
serves as the embedding and as the output head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf.quants import Q4_K

GROUP = 16  # output rows per vector

# GGUF block formats with a kernel, and their (weights per block, bytes per block).
KERNEL_TYPES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q5_0": (32, 22),
                "Q4_K": (256, 144), "Q6_K": (256, 210)}


@dataclass
class Quants:
    """Integer weights of some rows in input order, with their blocks' scales: w = s * t(q) (+ m).
    kind "q4": q uint8 0..15, t(q) = q - 8 when signed else q; kind "q8": q int8, t(q) = q."""
    kind: str
    q: torch.Tensor  # [rows, in]
    scales: torch.Tensor  # [rows, in / block], float16 or float32
    mins: torch.Tensor | None  # like scales
    block: int
    signed: bool = False

    def values(self) -> torch.Tensor:
        """float32 [rows, in]: s * t(q) + m, the same float32 operations as the gguf package's dequantize."""
        q = self.q.float() - 8 if self.signed else self.q.float()
        s = self.scales.float().repeat_interleave(self.block, dim=1)
        w = s * q
        return w if self.mins is None else w + self.mins.float().repeat_interleave(self.block, dim=1)


@dataclass
class PackedMatrix:
    """W [out_features, in_features] in a kernel layout. kind: "f32" | "bf16" (data: the float
    values in 16-row groups) or "q4" | "q8" (data: uint8 [groups, blocks, cell bytes])."""
    kind: str
    data: torch.Tensor
    out_features: int
    in_features: int
    block: int  # inputs per scale; for the dense kinds the kernel's input width (bfloat16: even)
    half_scales: bool = False
    has_min: bool = False
    signed: bool = False
    source: str = ""  # the format it came from: "Q4_1", "bfloat16", ...

    @property
    def weight_bytes(self) -> int:
        """Bytes of one cell's integer weights."""
        return self.block * GROUP // 2 if self.kind == "q4" else self.block * GROUP

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def quants(self, ids: torch.Tensor) -> Quants:
        """The integer weights and scales of rows `ids`."""
        group, j = ids // GROUP, ids % GROUP
        cells = self.data.index_select(0, group)  # [n, blocks, cell bytes] (indexing with [] takes ms here)
        n, blocks = cells.shape[:2]
        at = torch.arange(n)
        wb, sb = self.weight_bytes, GROUP * (2 if self.half_scales else 4)
        if self.kind == "q4":
            # word (o, member) of vector v holds input 8v + 2c + member in its nibble c
            w = cells[..., :wb].reshape(n, blocks, 4, GROUP, 2, 2)[at, :, :, j]  # [n, blocks, v, member, byte]
            nibbles = torch.stack([w & 15, w >> 4], dim=-1).reshape(n, blocks, 4, 2, 4)  # [..., member, c]
            q = nibbles.transpose(-1, -2).reshape(n, self.in_features)
        else:
            q = cells[..., :wb].reshape(n, blocks, self.block // 2, GROUP, 2)[at, :, :, j].reshape(n, self.in_features).view(torch.int8)
        dtype = torch.float16 if self.half_scales else torch.float32

        def per_row(part: torch.Tensor) -> torch.Tensor:
            return part.contiguous().view(dtype).reshape(n, blocks, GROUP)[at, :, j]

        scales = per_row(cells[..., wb : wb + sb])
        mins = per_row(cells[..., wb + sb : wb + 2 * sb]) if self.has_min else None
        return Quants(self.kind, q, scales, mins, self.block, self.signed)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), in_features]: those rows of W, dequantized."""
        if self.kind in ("f32", "bf16"):
            groups = self.data.index_select(0, ids // GROUP)  # [n, in, 16] or [n, in / 2, 16, 2]
            values = groups[torch.arange(len(ids)), :, ids % GROUP].reshape(len(ids), self.block)
            return values[:, : self.in_features].float()
        return self.quants(ids).values()

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features))

    def select(self, ids: torch.Tensor) -> "PackedMatrix":
        """A matrix of rows `ids` of this one, in the same format (for a partial output head)."""
        if self.kind in ("f32", "bf16"):
            return pack_dense(self.rows(ids).to(self.data.dtype))
        return pack_quants(self.quants(ids), self.source)


def _groups(rows: int) -> int:
    return -(-rows // GROUP)


def pack_dense(weight: torch.Tensor) -> PackedMatrix:
    """[out, in] float32 or bfloat16 -> 16 output rows per vector (float32 [out/16, in, 16];
    bfloat16 [out/16, in/2, 16, 2]: the input pairs of the BF16 dot product), zero-padded."""
    out, inp = weight.shape
    bf16 = weight.dtype == torch.bfloat16
    width = inp + inp % 2 * bf16
    padded = torch.zeros(_groups(out) * GROUP, width, dtype=weight.dtype)
    padded[:out, :inp] = weight
    g = padded.shape[0] // GROUP
    if bf16:
        data = padded.view(g, GROUP, width // 2, 2).permute(0, 2, 1, 3).contiguous()
    else:
        data = padded.view(g, GROUP, width).permute(0, 2, 1).contiguous()
    return PackedMatrix("bf16" if bf16 else "f32", data, out, inp, width, source=str(weight.dtype).removeprefix("torch."))


def pack_quants(quants: Quants, source: str) -> PackedMatrix:
    """Integer weights and scales -> cells of 16 rows x one block: weights, scales, minimums.
    (numpy: its strided copies of bytes are several times faster than torch's here.)"""
    rows, inp = quants.q.shape
    g, blocks = _groups(rows), inp // quants.block
    pad = g * GROUP - rows

    def padded(t: torch.Tensor) -> np.ndarray:
        a = t.numpy()
        return np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) if pad else a

    q = padded(quants.q)
    if quants.kind == "q4":
        # [g, o, block, v, c, member] -> [g, block, v, o, member, c]; nibbles c0 c1 | c2 c3 make the bytes
        q = q.reshape(g, GROUP, blocks, 4, 4, 2).transpose(0, 2, 3, 1, 5, 4)
        w = (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(g, blocks, -1)
    else:
        w = q.view(np.uint8).reshape(g, GROUP, blocks, quants.block // 2, 2).transpose(0, 2, 3, 1, 4).reshape(g, blocks, -1)
    parts = [w]
    for s in (quants.scales, quants.mins):
        if s is not None:
            parts.append(np.ascontiguousarray(padded(s).reshape(g, GROUP, blocks).transpose(0, 2, 1)).view(np.uint8))
    data = torch.from_numpy(np.concatenate(parts, axis=-1))
    return PackedMatrix(quants.kind, data, rows, inp, quants.block, quants.scales.dtype == torch.float16,
                        quants.mins is not None, quants.signed, source)


def quantize_q8_0(weight: torch.Tensor) -> PackedMatrix:
    """float weights [out, in] (in a multiple of 32) -> Q8_0, rounded as llama.cpp rounds it:
    d = max|w| / 127 per block of 32, q = round(w / d), d stored as float16."""
    out, inp = weight.shape
    w = weight.float().reshape(out, inp // 32, 32)
    d = w.abs().amax(dim=-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(w * inv.unsqueeze(-1)).to(torch.int8).reshape(out, inp)
    return pack_quants(Quants("q8", q, d.to(torch.float16), None, 32), "q8_0")


def from_gguf(type_name: str, raw: np.ndarray) -> PackedMatrix:
    """raw uint8 [rows, bytes per row]: the tensor's blocks as the file stores them."""
    return pack_quants(decode(type_name, raw), type_name)


def decode(type_name: str, raw: np.ndarray) -> Quants:
    """The integer weights and scales of GGUF blocks, exactly (the layouts of ggml-quants.c)."""
    per_block, nbytes = KERNEL_TYPES[type_name]
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, nbytes)  # [rows, blocks, bytes]
    n = b.shape[1]

    def half(part: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(part).view(np.float16).reshape(rows, -1))

    def nibbles(qs: np.ndarray) -> np.ndarray:  # 16 bytes -> 32 values: low nibbles first
        return np.concatenate([qs & 15, qs >> 4], axis=-1)

    if type_name in ("Q4_0", "Q4_1"):
        start = 2 if type_name == "Q4_0" else 4
        q = torch.from_numpy(nibbles(b[..., start:]).reshape(rows, -1))
        mins = half(b[..., 2:4]) if type_name == "Q4_1" else None
        return Quants("q4", q, half(b[..., :2]), mins, 32, signed=type_name == "Q4_0")
    if type_name == "Q8_0":
        return Quants("q8", torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1)),
                      half(b[..., :2]), None, 32)
    if type_name == "Q5_0":
        high = np.ascontiguousarray(b[..., 2:6]).view(np.uint32) >> np.arange(32, dtype=np.uint32)  # bit j: weight j
        q = (nibbles(b[..., 6:]) | ((high & 1).astype(np.uint8) << 4)).astype(np.int8) - np.int8(16)
        return Quants("q8", torch.from_numpy(q.reshape(rows, -1)), half(b[..., :2]), None, 32)
    if type_name == "Q4_K":
        d = half(b[..., 0:2]).float().reshape(rows, n, 1)
        dmin = half(b[..., 2:4]).float().reshape(rows, n, 1)
        sc, m = (torch.from_numpy(a.astype(np.float32)).reshape(rows, n, 8)
                 for a in Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12)))
        # 32 bytes per pair of sub-blocks: low nibbles are the first sub-block, high the second
        qs = b[..., 16:].reshape(rows, n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
        q = torch.from_numpy((qs & 15).reshape(rows, -1))
        # d * sc and dmin * m are exact in float32 (11-bit times 6-bit significands)
        return Quants("q4", q, (d * sc).reshape(rows, -1), -(dmin * m).reshape(rows, -1), 32)
    if type_name == "Q6_K":
        ql, qh = b[..., :128].reshape(rows * n, -1), b[..., 128:192].reshape(rows * n, -1)
        ql = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 15
        qh = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        q = (ql.reshape(-1, 8, 32) | (qh.reshape(-1, 8, 32) << 4)).astype(np.int8) - np.int8(32)
        sc = torch.from_numpy(np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)).reshape(rows, n, 16)
        d = half(b[..., 208:210]).float().reshape(rows, n, 1)
        return Quants("q8", torch.from_numpy(q.reshape(rows, -1)), (d * sc).reshape(rows, -1), None, 16)
    raise ValueError(f"no kernel for {type_name}")
