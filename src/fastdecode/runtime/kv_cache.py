"""Static KV cache of one sequence, preallocated once for its prompt plus its new tokens.

Layout: values [num_layers, num_kv_heads, capacity, head_dim] and keys transposed,
[num_layers, num_kv_heads, head_dim, capacity], so that the attention kernel reads 16 consecutive
keys per vector load (kernels/attention.c). Rows [0, length) are
committed. A forward writes its n new rows at [length, length + n) and attends over
[0, length + n) without committing them; the decode loop then keeps the rows it accepted. So
appending, rolling back and keeping the accepted path of a draft tree are index operations on
the same storage, never a reallocation.
"""
from __future__ import annotations

import torch

from ..errors import FastDecodeError


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype):
        self.k = torch.zeros(num_layers, num_kv_heads, head_dim, capacity, dtype=dtype)
        self.v = torch.zeros(num_layers, num_kv_heads, capacity, head_dim, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    def check_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise FastDecodeError(
                f"KV cache full: {self.length} rows + {n} new > capacity {self.capacity}"
            )

    def commit(self, n: int) -> None:
        """Accept all n rows written by the last forward."""
        self.length += n

    def keep(self, rows: list[int]) -> None:
        """Accept only these rows of the last forward (offsets from `length`, increasing), in order."""
        n = len(rows)
        if rows == list(range(n)):
            self.length += n
            return
        src = torch.tensor(rows, dtype=torch.long) + self.length
        dst = slice(self.length, self.length + n)
        # Advanced indexing copies first, so overlapping source and destination are safe.
        self.k[:, :, :, dst] = self.k[:, :, :, src]
        self.v[:, :, dst] = self.v[:, :, src]
        self.length += n

    def rollback(self, length: int) -> None:
        """Forget every row from `length` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.length} rows")
        self.length = length
