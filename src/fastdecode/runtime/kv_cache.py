"""Paged KV cache: sequences hold blocks of a shared pool, taken as they grow (as vLLM pages it).

Pool layout, per layer: keys [blocks, kv_heads, head_dim, B] (transposed, so that the attention
kernel reads 16 consecutive keys per vector load) and values [blocks, kv_heads, B, head_dim]. Row j
of a sequence lives in block table[j // B] at offset j % B.

A sequence's rows [0, length) are committed. A forward writes its n new rows at
[length, length + n) and attends over [0, length + n) without committing them; the decode loop
then keeps the rows it accepted. So appending, rolling back and keeping the accepted path of a
draft tree are index operations, never a reallocation.

A pool either has a byte budget (the server: a fixed number of blocks, and `KVPoolFull` when none is
free) or grows on demand (one request in the library, a draft model's cache). Its storage is
allocated empty, so the operating system commits memory only for blocks that have been written.

Prefix caching (runtime/prefix_cache.py, as vLLM's): blocks are reference-counted. A sequence that
opts in publishes each block once its committed rows fill it, and a later sequence whose tokens start
with the same prefix adopts those blocks read-only instead of prefilling them. A published block
whose last reference goes stays cached (idle, still found by its key) until the pool needs a block:
allocation takes free blocks first, then evicts the least recently used idle ones, and only then
grows (or, under a budget, raises KVPoolFull). So the cache only ever fills room the pool already
has: a budgeted pool holds no more blocks for it, and a growing pool never grows because of it.

A shared block is never written again. The forward writes rows at and beyond `length`, `keep` copies
rows beyond `length` to rows at and beyond it, and only blocks that committed rows fill are ever
published or adopted; `rollback` refuses to go below them.
"""
from __future__ import annotations

import torch

from ..errors import FastDecodeError
from .prefix_cache import ROOT, PrefixIndex, block_key, chain_keys

BLOCK_ROWS = 32  # a power of two and a multiple of 16 (the attention kernel's vector of keys)


def blocks_for(rows: int) -> int:
    """Blocks that hold `rows` rows."""
    return -(-rows // BLOCK_ROWS)


class KVPoolFull(FastDecodeError):
    """The pool's budget has no free block left."""


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 rows: int = 0, budget_bytes: int | None = None):
        """With budget_bytes: as many blocks as fit in it, and never more. Else room for `rows` rows
        to begin with, doubled whenever it runs out."""
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.fixed = dtype, budget_bytes is not None
        self.k = self.v = torch.empty(0)
        self.num_blocks = 0
        self.free: list[int] = []  # unreferenced blocks holding nothing worth keeping
        self.refs: list[int] = []  # per block: the caches holding it
        self.prefix = PrefixIndex()  # published blocks, and the idle ones among them in LRU order
        self.prefix_queries = self.prefix_hits = 0  # tokens looked up, and of those found (vLLM's counters)
        blocks = budget_bytes // self.bytes_per_block if self.fixed else blocks_for(rows)
        if self.fixed and blocks < 1:
            raise FastDecodeError(f"a KV budget of {budget_bytes} bytes holds no block of {self.bytes_per_block} bytes")
        self._grow(max(blocks, 1))

    @property
    def bytes_per_block(self) -> int:
        layers, kv_heads, head_dim = self.shape
        return 2 * layers * kv_heads * head_dim * BLOCK_ROWS * self.dtype.itemsize

    @property
    def used_blocks(self) -> int:
        """Blocks some cache references (cached idle ones are not counted: they can be taken)."""
        return self.num_blocks - len(self.free) - self.cached_blocks

    @property
    def cached_blocks(self) -> int:
        """Published blocks no cache references: kept for their prefix until evicted."""
        return len(self.prefix.idle)

    @property
    def available(self) -> int:
        """Blocks an allocation can take without growing: the free ones, then the evictable ones."""
        return len(self.free) + self.cached_blocks

    def allocate(self, n: int) -> list[int]:
        if n > self.available and self.fixed:
            raise KVPoolFull(f"KV cache budget exhausted: {n} blocks needed, {self.available} free "
                             f"of {self.num_blocks}")
        while len(self.free) < n and self.prefix.idle:  # free blocks first, then evict
            self.free.append(self.prefix.evict())
        if n > len(self.free):
            self._grow(max(self.num_blocks, n - len(self.free)))
        taken, self.free = self.free[-n:] if n else [], self.free[: len(self.free) - n]
        for block in taken:
            self.refs[block] = 1
        return taken[::-1]

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Last freed, first reused: recently written pages stay
        the ones in use. An idle published block joins the LRU queue, a chain's last block first (as
        in vLLM), so that eviction takes a prefix's tail before the blocks its head is found by."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.prefix.holds(block):
                    self.prefix.park(block)
                else:
                    self.free.append(block)

    def publish(self, block: int, key: bytes) -> None:
        """Offer a block that committed rows fill for reuse by the prefix `key` names."""
        self.prefix.publish(block, key)

    def adopt(self, keys) -> list[tuple[bytes, int]]:
        """Take a reference to the blocks of the longest cached run of `keys`; their (key, block)."""
        found = self.prefix.match(keys)
        for _, block in found:
            if self.refs[block] == 0:
                self.prefix.unpark(block)
            self.refs[block] += 1
        return found

    def _grow(self, extra: int) -> None:
        layers, kv_heads, head_dim = self.shape
        total = self.num_blocks + extra
        k = torch.empty(layers, total, kv_heads, head_dim, BLOCK_ROWS, dtype=self.dtype)
        v = torch.empty(layers, total, kv_heads, BLOCK_ROWS, head_dim, dtype=self.dtype)
        if self.num_blocks:
            k[:, : self.num_blocks] = self.k
            v[:, : self.num_blocks] = self.v
        self.k, self.v = k, v
        self.free = list(range(total - 1, self.num_blocks - 1, -1)) + self.free
        self.refs += [0] * extra
        self.num_blocks = total


class KVCache:
    def __init__(self, pool: KVPool, capacity: int):
        """capacity: rows this sequence may ever hold (prompt, new tokens and a draft's headroom)."""
        self.pool, self.capacity = pool, capacity
        self.blocks: list[int] = []
        self.table = torch.zeros(0, dtype=torch.long)  # self.blocks as a tensor, for the kernel
        self.length = 0
        # The prefix keys of the leading blocks that committed rows fill, as far as adopt and publish
        # have gone: those blocks may be shared, so nothing writes them again.
        self.sealed: list[bytes] = []

    def reserve(self, rows: int) -> None:
        """Hold blocks for `rows` rows (KVPoolFull when a budgeted pool has too few free)."""
        if rows > self.capacity:
            raise FastDecodeError(f"KV cache full: {rows} rows > capacity {self.capacity}")
        need = blocks_for(rows) - len(self.blocks)
        if need > 0:
            self.blocks += self.pool.allocate(need)
            self.table = torch.tensor(self.blocks, dtype=torch.long)

    def check_room(self, n: int) -> None:
        self.reserve(self.length + n)

    @property
    def spare_rows(self) -> int:
        """Rows beyond `length` in blocks this sequence already holds."""
        return len(self.blocks) * BLOCK_ROWS - self.length

    def room(self) -> int:
        """Rows this sequence could still take beyond `length`: its blocks' and the pool's free ones."""
        spare = float("inf") if not self.pool.fixed else self.pool.available * BLOCK_ROWS
        return int(min(self.spare_rows + spare, self.capacity - self.length))

    def release(self) -> None:
        """Give every block back to the pool (the sequence finished or was preempted); the ones
        published stay cached there until evicted."""
        self.pool.release(self.blocks)
        self.blocks, self.table, self.length, self.sealed = [], torch.zeros(0, dtype=torch.long), 0, []

    def adopt(self, tokens: list[int], limit: int) -> int:
        """Start an empty cache with the pool's cached blocks holding the longest prefix of `tokens`,
        of at most `limit` rows (whole blocks), shared read-only. Counts the lookup in the pool's
        prefix_queries and prefix_hits; returns the rows adopted."""
        if self.blocks:
            raise ValueError("only an empty cache adopts cached blocks")
        found = self.pool.adopt(chain_keys(tokens[: limit - limit % BLOCK_ROWS], BLOCK_ROWS))
        self.sealed = [key for key, _ in found]
        self.blocks = [block for _, block in found]
        self.table = torch.tensor(self.blocks, dtype=torch.long)
        self.length = len(self.blocks) * BLOCK_ROWS
        self.pool.prefix_queries += len(tokens)
        self.pool.prefix_hits += self.length
        return self.length

    def publish(self, tokens: list[int]) -> None:
        """Offer for reuse every block that committed rows now fill; `tokens`: the token of each row
        (at least; those beyond `length` are ignored)."""
        full = min(self.length, len(tokens)) // BLOCK_ROWS
        for i in range(len(self.sealed), full):
            key = block_key(self.sealed[-1] if self.sealed else ROOT, tokens[i * BLOCK_ROWS : (i + 1) * BLOCK_ROWS])
            self.sealed.append(key)
            self.pool.publish(self.blocks[i], key)

    def slots(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of rows [start, start + n), as two int64 tensors."""
        rows = torch.arange(start, start + n)
        return self.table[rows // BLOCK_ROWS], rows % BLOCK_ROWS

    def keys(self, layer: int, end: int) -> torch.Tensor:
        """Rows [0, end) of a layer's keys, gathered: [kv_heads, head_dim, end]."""
        k = self.pool.k[layer, self.table[: blocks_for(end)]]  # [blocks, kv, d, B]
        return k.permute(1, 2, 0, 3).flatten(2)[..., :end]

    def values(self, layer: int, end: int) -> torch.Tensor:
        """Rows [0, end) of a layer's values, gathered: [kv_heads, end, head_dim]."""
        v = self.pool.v[layer, self.table[: blocks_for(end)]]  # [blocks, kv, B, d]
        return v.permute(1, 0, 2, 3).flatten(1, 2)[:, :end]

    def commit(self, n: int) -> None:
        """Accept all n rows written by the last forward."""
        self.length += n

    def keep(self, rows: list[int]) -> None:
        """Accept only these rows of the last forward (offsets from `length`, increasing), in order."""
        n = len(rows)
        if rows == list(range(n)):
            self.length += n
            return
        src_block, src_offset = self.slots(self.length, max(rows) + 1)
        index = torch.tensor(rows)
        src_block, src_offset = src_block[index], src_offset[index]
        dst_block, dst_offset = self.slots(self.length, n)
        # Advanced indexing copies first, so overlapping source and destination are safe.
        k, v = self.pool.k, self.pool.v
        k[:, dst_block, :, :, dst_offset] = k[:, src_block, :, :, src_offset]
        v[:, dst_block, :, dst_offset] = v[:, src_block, :, src_offset]
        self.length += n

    def rollback(self, length: int) -> None:
        """Forget every row from `length` on (their blocks stay held, for the next rows)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.length} rows")
        if length < len(self.sealed) * BLOCK_ROWS:  # its rows would be written again, under other sequences
            raise ValueError(f"cannot roll back to {length}: rows below {len(self.sealed) * BLOCK_ROWS} may be shared")
        self.length = length
