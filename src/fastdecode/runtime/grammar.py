"""Structured output: a JSON Schema, a regular expression, a Lark grammar or "any JSON object" that the
generated text must follow, enforced token by token with llguidance (github.com/guidance-ai/llguidance,
the engine vLLM and SGLang also use; benchmarks/grammar_engines.py compares it with xgrammar and
outlines-core on the same schemas).

Constrained decoding's target distribution is the model's restricted to the tokens the grammar allows
next, renormalised: the logits of forbidden tokens become -inf before temperature and the filters
(runtime/sampling.py), and greedy takes the argmax over the allowed tokens. Under speculation each
verify row is restricted by the grammar's state after that row's own context, the committed tokens
plus the drafted path to it, exactly as penalties are (runtime/verify.py's `adjust`): the matcher
consumes the path's tokens as verification walks down the tree and gives them back (rollback) when
the step ends, then consumes what was committed. So every lossless method's output is constrained
`ar`'s, token for token under greedy and in distribution under sampling.

Two things make speculation pay here: drafted nodes the grammar forbids are cut before the forward
(they could never be accepted), and where the grammar forces the next bytes (a key name, a closing
brace and quote), its own tokens for them are drafted with certainty (SGLang's jump-forward): the
target still verifies them, so a model that would write the same bytes with other tokens stays exact.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import FastDecodeError
from .tree import DraftTree

KINDS = ("json_schema", "json_object", "regex", "grammar")
SOURCE = "grammar"  # the provenance of an accepted forced token


@dataclass
class GrammarTimes:
    """Seconds spent in llguidance by every Grammar of this process, by kind, and calls: compile
    (Grammar()), mask (allowed(): one row's token mask) and walk (commit, forced, valid_prefix).
    Only read by `fastdecode bench --structured` (bench/structured.py), which resets it per answer."""

    compile_s: float = 0.0
    mask_s: float = 0.0
    walk_s: float = 0.0
    compiles: int = 0
    masks: int = 0
    walks: int = 0

    def reset(self) -> None:
        self.__init__()


TIMES = GrammarTimes()


def _timed(kind: str):
    def wrap(f):
        @functools.wraps(f)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                setattr(TIMES, kind + "_s", getattr(TIMES, kind + "_s") + time.perf_counter() - start)
                setattr(TIMES, kind + "s", getattr(TIMES, kind + "s") + 1)
        return timed
    return wrap


@dataclass(frozen=True)
class Constraint:
    """What the output must follow. kind: json_schema (spec: the schema as JSON text), json_object
    (any JSON object; spec ""), regex (the whole output matches it), grammar (Lark syntax, as llguidance
    reads it; its start rule is `start`)."""

    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FastDecodeError(f"invalid constraint kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.kind != "json_object" and not (isinstance(self.spec, str) and self.spec):
            raise FastDecodeError(f"a {self.kind} constraint needs its text")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except json.JSONDecodeError as exc:
                raise FastDecodeError(f"the JSON Schema is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise FastDecodeError("a JSON Schema is an object (or true / false)")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Constraint":
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (FastDecodeError naming what it cannot take)."""
        from llguidance import LLMatcher

        try:
            if self.kind == "json_schema":
                return LLMatcher.grammar_from_json_schema(self.spec)
            if self.kind == "json_object":
                return LLMatcher.grammar_from_json_schema('{"type": "object"}')
            if self.kind == "regex":
                return LLMatcher.grammar_from_regex(self.spec)
            return LLMatcher.grammar_from_lark(self.spec)
        except (ValueError, TypeError) as exc:
            raise FastDecodeError(f"invalid {self.kind.replace('_', ' ')}: {exc}") from None


@lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer, width: int):
    """llguidance's view of a tokenizer, built once per tokenizer object: serializing the tokenizer
    alone takes ~20 ms, which every request would otherwise pay on the model's thread."""
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer.to_json(), n_vocab=width, eos_token=sorted(tokenizer.eos_ids))


def check_constraint(constraint: Constraint, tokenizer, width: int) -> None:
    """Compile it once to find out whether llguidance takes it (FastDecodeError naming the problem)."""
    Grammar(constraint, tokenizer, width)


class Grammar:
    """One request's grammar state over the committed tokens, plus the drafted path verification is
    walking (`pending`), which goes back when the step settles."""

    @_timed("compile")
    def __init__(self, constraint: Constraint, tokenizer, width: int):
        from llguidance import LLMatcher

        self.width = width
        self.eos = frozenset(tokenizer.eos_ids)
        self.matcher = LLMatcher(_ll_tokenizer(tokenizer, width), constraint.grammar_text(), log_level=0)
        self._check(f"the {constraint.kind.replace('_', ' ')} cannot be used")
        self.pending: list[int] = []

    def _check(self, what: str) -> None:
        if self.matcher.is_error():
            raise FastDecodeError(f"{what}: {self.matcher.get_error()}")

    def _follow(self, path: list[int]) -> None:
        """Bring the matcher to the committed tokens followed by `path`."""
        same = 0
        while same < min(len(path), len(self.pending)) and path[same] == self.pending[same]:
            same += 1
        if same < len(self.pending):
            self.matcher.rollback(len(self.pending) - same)
        for token in path[same:]:
            self.matcher.consume_token(token)
        self.pending = list(path)
        self._check("the grammar was left")

    @_timed("mask")
    def allowed(self, path: list[int] = ()) -> torch.Tensor:
        """Bool [width]: the tokens the grammar allows after the committed tokens and `path`."""
        if any(token in self.eos for token in path):
            # Nothing after an end of sequence is ever emitted, and the matcher, stopped by it,
            # would not count it among the tokens a rollback undoes.
            return torch.ones(self.width, dtype=torch.bool)
        self._follow(list(path))
        return torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)[: self.width] > 0

    def restrict(self, row: torch.Tensor, path: list[int] = ()) -> torch.Tensor:
        """A copy of one row of logits with the tokens the grammar forbids at -inf."""
        return row.float().masked_fill(~self.allowed(path), float("-inf"))

    @_timed("walk")
    def commit(self, tokens: list[int]) -> None:
        """The step's committed tokens: the walked path goes back, these stay."""
        self._follow([])
        for token in tokens:
            self.matcher.consume_token(token)
        self._check("a committed token left the grammar")

    @_timed("walk")
    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, from the first, the grammar allows after the committed ones."""
        self._follow([])
        return self.matcher.validate_tokens(tokens)

    @_timed("walk")
    def forced(self) -> list[int]:
        """The tokens the grammar forces next (its own tokenization of the forced bytes), maybe none."""
        self._follow([])
        return list(self.matcher.compute_ff_tokens())

    def with_forced(self, tree: DraftTree, budget: int, drafter: str) -> tuple[DraftTree, list[int]]:
        """`tree` (a drafter's, already cut to what the grammar allows) with the tokens the grammar
        forces next drafted as certain (SGLang's jump-forward, merged into the drafter's tree): the
        drafter's nodes along the forced tokens score 1, and the forced tokens it did not propose
        follow as new nodes, as far as `budget` allows. Returns the tree and, for each of its nodes,
        the node of `tree` it is (-1 for the grammar's own)."""
        forced = self.forced()
        origin = list(range(len(tree)))
        if not forced:
            return tree, origin
        tokens, parents = list(tree.tokens), list(tree.parents)
        scores = None if tree.scores is None and len(tree) else list(tree.scores or [])
        node = -1
        for depth, token in enumerate(forced):
            child = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
            if child is None:
                forced = forced[depth:]
                break
            if scores is not None:
                scores[child] = 1.0
            node = child
        else:
            forced = []
        forced = forced[: max(0, budget - len(tokens))]
        for token in forced:
            tokens.append(token)
            parents.append(node)
            node = len(tokens) - 1
            origin.append(-1)
        if scores is not None:
            scores += [1.0] * len(forced)
        sources = (tree.sources or [drafter] * len(tree)) + [SOURCE] * len(forced)
        probs = tree.draft_probs
        if probs is not None and forced:  # the grammar's tokens are point masses
            probs = torch.cat([probs, probs.new_zeros(len(forced), probs.shape[-1])])
        keep = None if tree.keep is None else tree.keep + [False] * len(forced)
        return DraftTree(tokens, parents, probs, scores, keep, sources), origin

    def allowed_nodes(self, tree: DraftTree) -> list[int]:
        """The nodes whose whole path from the root the grammar allows (closed under parents)."""
        good: list[int] = []
        paths: dict[int, list[int]] = {-1: []}
        for node, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
            if parent not in paths:
                continue
            path = paths[parent] + [token]
            if self.valid_prefix(path) == len(path):
                paths[node] = path
                good.append(node)
        return good
