"""A weight matrix and the fastest kernel for y = x @ W.T at decode-step sizes.

On this CPU (2 cores, AVX-512 with bf16), `torch.nn.functional.linear` with a row-major weight
streams it at about 10 GB/s for one row. Instead:
  * up to SKINNY_MAX_ROWS rows (decode steps, draft trees): our skinny GEMM
    (kernels/skinny_gemm.c), one pass over the weights, float32 or bfloat16 with float32
    accumulation, at 27-34 GB/s;
  * more rows (prefill chunks): `F.linear`, whose blocked GEMM reuses activations well;
  * without a C compiler: the weight reordered once into oneDNN's blocked layout for every size
    (22-30 GB/s for a few rows), or plain `F.linear` where oneDNN is unavailable too.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..kernels import skinny_gemm, native_lib

# oneDNN picks its blocked layout for an expected number of rows; 8 serves 1 to ~16 rows best.
_PACK_ROWS_HINT = 8
# Beyond this many rows (long prefills) a blocked GEMM that reuses activations wins.
SKINNY_MAX_ROWS = 80


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
        self.skinny = native_lib() if weight.dtype in (torch.float32, torch.bfloat16) else None
        self.packed = self.skinny is None and _onednn_usable(weight.dtype)
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_ROWS_HINT)
            if self.packed
            else weight.contiguous()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, in_features] -> [n, out_features]."""
        if self.skinny is not None and x.shape[0] <= SKINNY_MAX_ROWS:
            return skinny_gemm(self.skinny, self.weight, x.contiguous())
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)
