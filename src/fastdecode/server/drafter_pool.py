"""Drafters kept between a server's requests, so that the methods that learn from past text
(suffix's trie, recycling's successor table, auto's members, draft's calibration) keep learning.

A drafter holds one request at a time, so concurrent requests each borrow their own; a finished
request gives it back, and the next request with the same method and options takes the one used
last (so a lone client's requests all teach one drafter). Idle drafters are bounded twice: at most
`keep` of one kind (method and options), and at most `max_idle` across all kinds, the least
recently used kind losing its oldest first. So memory stays bounded however many requests ran at
once and however many different option sets clients send.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from ..drafters import Drafter, make_drafter


class DrafterPool:
    def __init__(self, target, keep: int, max_idle: int | None = None):
        self.target, self.keep = target, keep
        self.max_idle = max(keep, 2 * keep if max_idle is None else max_idle)
        self._idle: OrderedDict[tuple, list[Drafter]] = OrderedDict()  # least recently used kind first
        self._count = 0
        self._lock = threading.Lock()

    @staticmethod
    def _kind(method: str, options: dict) -> tuple:
        return method, tuple(sorted((k, repr(v)) for k, v in options.items()))

    @property
    def idle(self) -> int:
        return self._count

    def acquire(self, method: str, options: dict) -> Drafter:
        """An idle drafter of this kind, else a new one (FastDecodeError for bad options). A new one
        may load files or build tables: call it off the event loop."""
        kind = self._kind(method, options)
        with self._lock:
            idle = self._idle.get(kind)
            if idle:
                self._count -= 1
                drafter = idle.pop()
                if not idle:
                    del self._idle[kind]
                return drafter
        return make_drafter(method, self.target, **options)

    def release(self, method: str, options: dict, drafter: Drafter) -> None:
        kind = self._kind(method, options)
        with self._lock:
            idle = self._idle.setdefault(kind, [])
            self._idle.move_to_end(kind)
            if len(idle) >= self.keep:
                return
            idle.append(drafter)
            self._count += 1
            while self._count > self.max_idle:
                oldest_kind, oldest = next(iter(self._idle.items()))
                oldest.pop(0)
                self._count -= 1
                if not oldest:
                    del self._idle[oldest_kind]
