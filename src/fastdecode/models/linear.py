"""A weight matrix and y = x @ W.T, for the products the decoder layer does not fuse: the output
head and the partial heads of drafters. (Inside a decoder layer, layer.c multiplies the same
packed matrices itself.)

W is one packed matrix (models/quant.py) or several stacked by output rows (q, k and v). Stacked
parts of one layout are merged into one matrix, so that the kernel sees one stream. With the
native kernels (kernels/matmul.c) the product is batch-invariant and reads the weights in their
stored format. Without them the matrix is dequantized once into the activation dtype and
multiplied by PyTorch (not batch-invariant).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..kernels import Product, matmul, matrix, native_lib
from .quant import GROUP, PackedMatrix, pack_dense


def merge(parts: list[PackedMatrix]) -> list[PackedMatrix]:
    """Consecutive parts of one layout (and whole 16-row groups) joined into one matrix."""
    merged = [parts[0]]
    for p in parts[1:]:
        last = merged[-1]
        same = (last.kind, last.block, last.in_features, last.half_scales, last.has_min, last.signed) == (
            p.kind, p.block, p.in_features, p.half_scales, p.has_min, p.signed)
        if same and last.out_features % GROUP == 0:
            source = last.source if last.source == p.source else f"{last.source}+{p.source}"
            merged[-1] = dataclasses.replace(last, data=torch.cat([last.data, p.data]), source=source,
                                             out_features=last.out_features + p.out_features)
        else:
            merged.append(p)
    return merged


class Linear:
    def __init__(self, parts: list[PackedMatrix] | torch.Tensor, dtype: torch.dtype | None = None):
        """parts: W's row blocks, stacked in order, or W itself as a float32 / bfloat16 tensor; dtype:
        the activations' (x's) dtype, by default a tensor W's own."""
        if isinstance(parts, torch.Tensor):
            dtype = dtype or parts.dtype
            parts = [pack_dense(parts)]
        self.parts = merge(parts)
        self.sources = {p.source for p in parts}  # formats the rows were stored in
        self.out_features = sum(p.out_features for p in self.parts)
        self.in_features = self.parts[0].in_features
        self.native = native_lib()
        if self.native is not None:
            self.matrices = [matrix(p) for p in self.parts]
        else:
            self.weight = torch.cat([p.dequantize() for p in self.parts]).to(dtype)
            self.parts = None  # the dequantized copy replaces the packed one

    def dense(self) -> torch.Tensor:
        """W dequantized, float32 [out_features, in_features] (a copy, for PyTorch's autograd)."""
        if self.parts is None:
            return self.weight.float()
        return torch.cat([p.dequantize() for p in self.parts]).float()

    def product(self) -> Product:
        """The kernel's view of this product, for layer.c."""
        p = Product()
        at = 0
        for i, (part, m) in enumerate(zip(self.parts, self.matrices)):
            p.part[i], p.at[i] = m, at
            at += part.out_features
        p.parts = len(self.parts)
        return p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, in_features] in the activation dtype -> float32 [n, out_features]."""
        if self.native is None:
            return F.linear(x, self.weight).float()
        outs = [matmul(self.native, p, m, x) for p, m in zip(self.parts, self.matrices)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
