"""Decoding methods by name. Each is a Drafter (see base.py) in a file of its own."""
from __future__ import annotations

from ..errors import FastDecodeError
from .autoregressive import Autoregressive
from .base import Drafter

METHODS = {"ar": Autoregressive}


def make_drafter(method: str, **options) -> Drafter:
    if method not in METHODS:
        raise FastDecodeError(f"unknown method {method!r}; available methods: {', '.join(METHODS)}")
    try:
        return METHODS[method](**options)
    except TypeError as exc:
        raise FastDecodeError(f"method {method!r} does not take the options {sorted(options)}") from exc
