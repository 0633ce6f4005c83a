"""Decoding methods by name. Each is a Drafter (see base.py) in a file of its own."""
from __future__ import annotations

import inspect

from ..errors import FastDecodeError
from .auto import Auto
from .autoregressive import Autoregressive
from .base import Drafter, Target
from .draft_model import DraftModel
from .eagle import Eagle
from .hydra import Hydra
from .layerskip import LayerSkip
from .lookahead import Lookahead
from .lud import LUD, LUDConfidence
from .medusa import Medusa
from .ngram import NGram
from .recycling import TokenRecycling
from .suffix import SuffixDecoding

# Every method is lossless (class attribute `lossless`) but lud-confidence, LUD's published rule;
# `auto` is the default of the CLI and API.
METHODS = {
    "ar": Autoregressive,
    "ngram": NGram,
    "suffix": SuffixDecoding,
    "recycling": TokenRecycling,
    "lookahead": Lookahead,
    "layerskip": LayerSkip,
    "draft": DraftModel,
    "eagle": Eagle,
    "medusa": Medusa,
    "hydra": Hydra,
    "lud": LUD,
    "lud-confidence": LUDConfidence,
    "auto": Auto,
}


def method_options(method: str) -> list[str]:
    """The keyword options a method takes."""
    params = inspect.signature(METHODS[method].__init__).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in named and p.name not in ("self", "target")]


def check_method(method: str, options: dict) -> None:
    """Raise a clear error for an unknown method or an option it does not take."""
    if method not in METHODS:
        raise FastDecodeError(f"unknown method {method!r}; available methods: {', '.join(METHODS)}")
    accepted = method_options(method)
    for name in options:
        if name not in accepted:
            owners = [m for m in METHODS if name in method_options(m)]
            belongs = f"; it belongs to method {' / '.join(owners)}" if owners else ""
            takes = f"its options are {', '.join(accepted)}" if accepted else "it takes no options"
            raise FastDecodeError(f"method {method!r} has no option {name!r}{belongs} ({takes})")


def parse_option(text: str, flag: str = "--option") -> tuple[str, object]:
    """A command line's KEY=VALUE, the value as a bool, int, float or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise FastDecodeError(f"{flag} takes KEY=VALUE, not {text!r}")
    if value.lower() in ("true", "false"):
        return key.replace("-", "_"), value.lower() == "true"
    for kind in (int, float):
        try:
            return key.replace("-", "_"), kind(value)
        except ValueError:
            pass
    return key.replace("-", "_"), value


def make_drafter(method: str, target: Target | None = None, **options) -> Drafter:
    check_method(method, options)
    cls = METHODS[method]
    if getattr(cls, "needs_target", False):
        if target is None:
            raise FastDecodeError(f"method {method!r} needs the target model (create it through LLM)")
        options["target"] = target
    return cls(**options)
