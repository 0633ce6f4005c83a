"""Drafters kept between a server's requests, so that the methods that learn from past text
(suffix's trie, recycling's successor table, auto's members, draft's calibration) keep learning.

A drafter holds one request at a time, so concurrent requests each borrow their own; a finished
request gives it back, and the next request with the same method and options takes the one used
last (so a lone client's requests all teach one drafter). At most `keep` idle ones are kept per
kind: memory stays bounded however many requests ran at once.
"""
from __future__ import annotations

import threading

from ..drafters import Drafter, make_drafter


class DrafterPool:
    def __init__(self, target, keep: int):
        self.target, self.keep = target, keep
        self._idle: dict[tuple, list[Drafter]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _kind(method: str, options: dict) -> tuple:
        return method, tuple(sorted(options.items()))

    def acquire(self, method: str, options: dict) -> Drafter:
        """An idle drafter of this kind, else a new one (FastDecodeError for bad options)."""
        with self._lock:
            idle = self._idle.get(self._kind(method, options))
            if idle:
                return idle.pop()
        return make_drafter(method, self.target, **options)

    def release(self, method: str, options: dict, drafter: Drafter) -> None:
        with self._lock:
            idle = self._idle.setdefault(self._kind(method, options), [])
            if len(idle) < self.keep:
                idle.append(drafter)
