"""A weight matrix and the kernel for y = x @ W.T.

With a C compiler (the normal case) every product runs on our packed GEMM (kernels/skinny_gemm.c):
one pass over the weights per call, float32 or bfloat16 with float32 accumulation, and a result
for each row that does not depend on the other rows (bitwise), for decode steps, draft trees and
prefills alike. The weight is repacked once at load into 16-output vectors; no plain copy is kept.
Without a compiler: the weight reordered once into oneDNN's blocked layout (22-30 GB/s for a few
rows here), or plain `F.linear` where oneDNN is unavailable too; neither is batch-invariant.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..kernels import native_lib, pack_weight, skinny_gemm

# oneDNN picks its blocked layout for an expected number of rows; 8 serves 1 to ~16 rows best.
_PACK_ROWS_HINT = 8


@functools.cache
def _onednn_usable(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4, dtype=dtype), _PACK_ROWS_HINT)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 4, dtype=dtype), w, None, "none", [], "")
        return bool((y == 4).all())
    except (RuntimeError, AttributeError):
        return False


class Linear:
    def __init__(self, weight: torch.Tensor):
        """weight: [out_features, in_features]."""
        self.out_features, self.in_features = weight.shape
        self.native = native_lib() if weight.dtype in (torch.float32, torch.bfloat16) else None
        self.onednn = self.native is None and _onednn_usable(weight.dtype)
        if self.native is not None:
            self.weight = pack_weight(weight)
        elif self.onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_ROWS_HINT)
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, in_features] -> [n, out_features]."""
        if self.native is not None:
            return skinny_gemm(self.native, self.weight, self.out_features, x)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)
