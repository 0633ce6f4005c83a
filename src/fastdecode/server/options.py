"""What a client may choose: the methods the operator allows and, for each, the options a request may
set, each a number (or a flag) within bounds. The operator decides what is loaded from disk and how
much memory it may take; a client chooses only among bounded numbers.

    - ar, ngram, suffix, recycling, lookahead, layerskip and auto: always available.
    - draft: only when the operator started the server with --draft-model (that model, no other).
    - eagle, medusa, hydra (trained heads): only when one is the server's --method, with the head
      the operator chose (its --option head=PATH, or the shipped one).
    - auto's members and head, draft's draft_model and the heads' head files are the operator's
      (serve's --method, --option and --draft-model) and never a client's.

A request's options are laid over the operator's options of that method (serve's --option, for
the default method). Anything else gets a 400 naming the field.
"""
from __future__ import annotations

from ..drafters import METHODS
from ..runtime.sampling import is_int, is_number

INT, FLOAT, BOOL = "an integer", "a number", "a flag"

_HEAD = {"depth": (INT, 1, 16), "beam": (INT, 1, 32), "top_k": (INT, 1, 32), "min_score": (FLOAT, 0.0, 0.999),
         "rest": (BOOL, None, None)}

# method -> option -> (kind, low, high), bounds inclusive.
CLIENT_OPTIONS: dict[str, dict[str, tuple]] = {
    "ar": {},
    "ngram": {"max_ngram": (INT, 1, 16), "min_ngram": (INT, 1, 16), "max_matches": (INT, 1, 64),
              "max_depth": (INT, 1, 64), "min_score": (FLOAT, 0.0, 0.999)},
    "suffix": {"max_depth": (INT, 2, 64), "max_match": (INT, 1, 63), "max_children": (INT, 1, 16),
               "max_history_tokens": (INT, 0, 65536), "min_score": (FLOAT, 0.0, 0.999)},
    "recycling": {"tree_size": (INT, 1, 80)},
    "lookahead": {"window": (INT, 1, 32), "ngram": (INT, 2, 16), "max_candidates": (INT, 0, 32),
                  "window_score": (FLOAT, 0.0, 1.0), "seed": (INT, 0, 2**31 - 1)},
    "layerskip": {"max_depth": (INT, 1, 16), "min_confidence": (FLOAT, 0.0, 0.999), "skip": (FLOAT, 0.01, 0.99),
                  "draft_vocab": (INT, 1, 65536), "trial_steps": (INT, 1, 1000), "adapt": (BOOL, None, None)},
    "draft": {"max_depth": (INT, 1, 16), "min_confidence": (FLOAT, 0.0, 0.999)},
    "eagle": _HEAD, "medusa": _HEAD, "hydra": _HEAD,
    "auto": {},
}
OPERATOR_ONLY = ("draft", "eagle", "medusa", "hydra")


class OptionError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class MethodPolicy:
    """The operator's configuration: the default method and its options, and the draft model."""

    def __init__(self, method: str, options: dict | None = None, draft_model: str | None = None):
        self.method, self.options, self.draft_model = method, dict(options or {}), draft_model

    def available(self) -> list[str]:
        return [m for m in METHODS if m not in OPERATOR_ONLY or m == self.method or (m == "draft" and self.draft_model)]

    def resolve(self, method: str | None, client: dict) -> tuple[str, dict]:
        """The method and its full options for a request (OptionError naming the field otherwise)."""
        method = method or self.method
        if method not in METHODS:
            raise OptionError(f"unknown method {method!r}; this server offers {', '.join(self.available())}",
                              "fastdecode.method")
        if method not in self.available():
            why = ("the operator enables it with --draft-model" if method == "draft"
                   else "its head is the operator's choice: it is available when it is the server's --method")
            raise OptionError(f"method {method!r} is not available on this server ({why}); "
                              f"available: {', '.join(self.available())}", "fastdecode.method")
        table = CLIENT_OPTIONS[method]
        for name, value in client.items():
            param = f"fastdecode.options.{name}"
            if name not in table:
                settable = f"its client options are {', '.join(table)}" if table else "it takes no client options"
                raise OptionError(f"method {method!r}: option {name!r} cannot be set by a request ({settable})", param)
            kind, low, high = table[name]
            if kind == BOOL:
                if not isinstance(value, bool):
                    raise OptionError(f"option {name!r} of {method!r} must be true or false", param)
                continue
            ok = is_int(value) if kind == INT else is_number(value)
            if not ok or not low <= value <= high:
                raise OptionError(f"option {name!r} of {method!r} must be {kind} in [{low}, {high}], not {value!r}", param)
        options = dict(self.options) if method == self.method else {}
        if method == "draft":
            options["draft_model"] = self.draft_model
        options.update(client)
        return method, options
