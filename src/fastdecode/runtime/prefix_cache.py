"""Prefix caching: full KV blocks found again by the tokens they hold (vLLM's automatic prefix caching,
https://docs.vllm.ai/en/latest/design/prefix_caching.html).

A full block's key is a hash of its BLOCK_ROWS token ids chained to its parent block's key, so a key
names the whole prefix up to the block's last row, not only the block's own tokens. Equal keys mean
equal prefixes, and equal prefixes mean bitwise equal rows: the forward is batch- and
chunk-invariant (models/decoder.py), so the rows any prefill of that prefix writes, in any chunks and
beside any other sequences, are the rows the block already holds. A later request whose prompt
starts with the same tokens shares those blocks instead of computing them again, and its output
does not change.

The hash is SHA-256, as vLLM's default: a collision would silently give a request another prompt's
rows, and Python's hash() of a tuple of ints is short and easily collided on purpose.

PrefixIndex only knows keys and blocks. Which blocks are referenced, and by how many sequences, is
the pool's business (kv_cache.KVPool): a published block no sequence references any more waits in
the index's LRU queue, still found by its key, until the pool needs a block and evicts it.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Iterator, Sequence

ROOT = b""  # the parent key of a sequence's first block


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a block holding `tokens`, after the prefix whose last block's key is `parent`."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def chain_keys(tokens: Sequence[int], block_rows: int, parent: bytes = ROOT) -> Iterator[bytes]:
    """The keys of each full block of `tokens`, in order, computed lazily (a lookup stops at its
    first miss without hashing the rest of a long prompt)."""
    for start in range(0, len(tokens) - block_rows + 1, block_rows):
        parent = block_key(parent, tokens[start : start + block_rows])
        yield parent


class PrefixIndex:
    def __init__(self):
        self.block_of: dict[bytes, int] = {}  # key -> the block holding that prefix's last rows
        self.key_of: dict[int, bytes] = {}  # the inverse, for the blocks published
        self.idle: OrderedDict[int, None] = OrderedDict()  # published blocks no sequence references, oldest first

    def holds(self, block: int) -> bool:
        return block in self.key_of

    def publish(self, block: int, key: bytes) -> None:
        """Index `block` under `key`, unless another block already holds that prefix (two sequences
        read the same prompt at once): then this one stays private and is freed as usual."""
        if key not in self.block_of and block not in self.key_of:
            self.block_of[key] = block
            self.key_of[block] = key

    def match(self, keys: Iterator[bytes]) -> list[tuple[bytes, int]]:
        """(key, block) of the longest run of `keys`, from the first, that the index holds."""
        found = []
        for key in keys:
            block = self.block_of.get(key)
            if block is None:
                break
            found.append((key, block))
        return found

    def park(self, block: int) -> None:
        """A published block's last reference went: it is now the most recently used idle one."""
        self.idle[block] = None

    def unpark(self, block: int) -> None:
        """An idle block is referenced again (a sequence adopted it)."""
        del self.idle[block]

    def evict(self) -> int:
        """Forget the least recently used idle block and return it, to be written with other rows."""
        block, _ = self.idle.popitem(last=False)
        del self.block_of[self.key_of.pop(block)]
        return block
