"""Speed and exactness of every decoding method on the Spec-Bench questions, on this machine.

What is measured: for a fixed, seeded sample of Spec-Bench questions (--per-group N from each of its
six task groups: MT-bench, translation, summarization, question answering, mathematical reasoning,
retrieval-augmented generation), every method generates a greedy answer of at most
--max-new-tokens tokens (EOS ends it early, as in Spec-Bench). Each question's first turn is sent
as a single user message through the model's chat template (`llm.prompt_ids(text)`); the later
MT-bench turns, which need the model's own answers fed back, come with `fastdecode bench`.

Per task group and overall, one row per method: tokens/s (total tokens / total time), speedup over
`ar` (ratio of those totals, on the same questions), the mean of the per-question speedups, mean
acceptance length (1 + accepted / drafts, summed over the group's questions: vLLM's definition,
Spec-Bench's "mean accepted tokens"), acceptance rate (accepted / drafted tokens) and the number of
answers whose token ids differ from `ar`'s (greedy decoding is lossless, so it must be 0).

Why the comparison is fair: one `LLM` (one model, one tokenizer, one thread pool) serves every
method; each method is warmed up once on a prompt outside the set; then the methods run one after
another on each question, question by question, so machine drift hits all of them alike. Drafter
instances persist inside the LLM across questions, as they would in a server (methods that learn
from earlier requests are meant to). Tokens are counted the same way for all (len(token_ids)) and
time is the request's wall time from the engine (prefill included, tokenization excluded).

Progress goes to stderr; the report (plain tables, or Markdown with --markdown) to stdout.
Exit status: 0, 1 when any method's greedy answer differed from `ar`'s, 2 on bad input.
Run:  python benchmarks/spec_bench.py [--per-group 10] [--methods ar,ngram,...] [--markdown]
"""
from __future__ import annotations

import argparse, datetime, json, os, platform, random, sys, time
from dataclasses import dataclass
from pathlib import Path

GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")  # Spec-Bench's order
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
GROUP_OF = {**{c: "mt_bench" for c in MT_BENCH_CATEGORIES}, **{g: g for g in GROUPS if g != "mt_bench"}}
ENV_VAR = "FASTDECODE_SPEC_BENCH"
BASELINE = "ar"
WARMUP_PROMPT = "Write a haiku about a cat sleeping in the sun."  # not a Spec-Bench question
WARMUP_TOKENS = 16


class QuestionError(ValueError):
    """A missing or malformed question file (the message is one line)."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    group: str
    turns: tuple[str, ...]


# ----------------------------------------------------------------------------- questions

def default_questions_path() -> tuple[Path, str]:
    """Where the questions are looked for without --questions, and why there."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data" / "spec_bench" / "question.jsonl", "the default location"


def task_group(category: str) -> str:
    """Spec-Bench's task group of a question category (the eight MT-bench categories -> mt_bench)."""
    if category not in GROUP_OF:
        raise QuestionError(f"unknown category {category!r}; known: {', '.join(GROUP_OF)}")
    return GROUP_OF[category]


def load_questions(path: str | Path) -> list[Question]:
    """Questions from a Spec-Bench jsonl file (question_id, category, turns), in file order."""
    path = Path(path)
    if not path.is_file():
        raise QuestionError(f"Spec-Bench questions not found at {path}")
    questions, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuestionError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise QuestionError(f"{where}: expected a JSON object")
            missing = [k for k in ("question_id", "category", "turns") if k not in obj]
            if missing:
                raise QuestionError(f"{where}: missing {', '.join(missing)}")
            qid, category, turns = obj["question_id"], obj["category"], obj["turns"]
            if not isinstance(qid, (int, str)) or isinstance(qid, bool):
                raise QuestionError(f"{where}: question_id must be an integer or a string")
            if qid in seen:
                raise QuestionError(f"{where}: duplicate question_id {qid!r}")
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
                raise QuestionError(f"{where}: turns must be a non-empty list of non-empty strings")
            if not isinstance(category, str):
                raise QuestionError(f"{where}: category must be a string")
            try:
                group = task_group(category)
            except QuestionError as exc:
                raise QuestionError(f"{where}: {exc}") from None
            seen.add(qid)
            questions.append(Question(qid, category, group, tuple(turns)))
    if not questions:
        raise QuestionError(f"{path} holds no questions")
    return questions


def group_questions(questions: list[Question]) -> dict[str, list[Question]]:
    """Task group -> its questions in file order; groups in Spec-Bench's order, absent ones left out."""
    by_group = {g: [q for q in questions if q.group == g] for g in GROUPS}
    return {g: qs for g, qs in by_group.items() if qs}


def sample_questions(groups: dict[str, list[Question]], per_group: int, seed: int = 0) -> dict[str, list[Question]]:
    """A fixed sample of `per_group` questions from each group (all of them when 0 or more than it
    holds), kept in file order. Each group draws from its own generator, seeded by (seed, group), so
    a group's sample does not depend on which other groups the file holds."""
    if per_group < 0:
        raise ValueError("per_group must be >= 0")
    sampled = {}
    for group, qs in groups.items():
        if per_group == 0 or per_group >= len(qs):
            sampled[group] = list(qs)
        else:
            picked = sorted(random.Random(f"{seed}:{group}").sample(range(len(qs)), per_group))
            sampled[group] = [qs[i] for i in picked]
    return sampled


# ----------------------------------------------------------------------------- statistics

def first_difference(ids: list[int], reference: list[int]) -> int | None:
    """First position where two token sequences differ (the shorter length if one is a prefix of
    the other), None when they are equal."""
    pos = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), None)
    if pos is None and len(ids) != len(reference):
        pos = min(len(ids), len(reference))
    return pos


def method_figures(runs: list[dict], baseline_runs: list[dict]) -> dict:
    """Figures of one method over a set of questions. runs / baseline_runs: records of the method
    and of `ar` on the same questions (keys question_id, num_tokens, time_s, drafts, draft_tokens,
    accepted_tokens, first_diff)."""
    tokens, seconds = sum(r["num_tokens"] for r in runs), sum(r["time_s"] for r in runs)
    drafts, drafted = sum(r["drafts"] for r in runs), sum(r["draft_tokens"] for r in runs)
    accepted = sum(r["accepted_tokens"] for r in runs)
    rate = lambda tok, s: tok / s if s > 0 else None  # noqa: E731
    tok_s = rate(tokens, seconds)
    base = {r["question_id"]: r for r in baseline_runs}
    base_tok_s = rate(sum(r["num_tokens"] for r in baseline_runs), sum(r["time_s"] for r in baseline_runs))
    per_question = []
    for r in runs:
        b = base.get(r["question_id"])
        mine, theirs = rate(r["num_tokens"], r["time_s"]), b and rate(b["num_tokens"], b["time_s"])
        if mine and theirs:
            per_question.append(mine / theirs)
    return {
        "questions": len(runs),
        "tokens": tokens,
        "time_s": seconds,
        "tokens_per_s": tok_s,
        "speedup": tok_s / base_tok_s if tok_s and base_tok_s else None,
        "mean_speedup": sum(per_question) / len(per_question) if per_question else None,
        "drafts": drafts,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "mean_acceptance_length": 1.0 + accepted / drafts if drafts else 1.0,
        "acceptance_rate": accepted / drafted if drafted else None,
        "differing_answers": sum(r["first_diff"] is not None for r in runs),
    }


def summarize(records: list[dict], methods: list[str], baseline: str = BASELINE) -> dict[str, dict[str, dict]]:
    """{group or "overall": {method: figures}} over the questions every method completed."""
    done = {}
    for r in records:
        done.setdefault(r["question_id"], set()).add(r["method"])
    complete = {q for q, ms in done.items() if set(methods) <= ms}
    records = [r for r in records if r["question_id"] in complete]
    scopes = {g: [r for r in records if r["group"] == g] for g in GROUPS}
    scopes = {g: rs for g, rs in scopes.items() if rs}
    scopes["overall"] = records
    return {
        scope: {m: method_figures([r for r in rs if r["method"] == m], [r for r in rs if r["method"] == baseline])
                for m in methods}
        for scope, rs in scopes.items()
    }


# ----------------------------------------------------------------------------- report

def format_table(headers: list[str], rows: list[list[str]], right: set[int], markdown: bool) -> str:
    """A Markdown table, or a plain one with aligned columns; `right`: right-aligned column indexes."""
    if markdown:
        rule = ["---:" if i in right else "---" for i in range(len(headers))]
        return "\n".join("| " + " | ".join(r) + " |" for r in [headers, rule, *rows])
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)]).rstrip()


def _num(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def group_table(figures: dict[str, dict], markdown: bool) -> str:
    headers = ["method", "tokens", "time s", "tok/s", "speedup", "mean per-question speedup",
               "mean acceptance length", "acceptance rate", "differing answers"]
    rows = []
    for m, f in figures.items():
        rows.append([f"`{m}`" if markdown else m, str(f["tokens"]), _num(f["time_s"], ".1f"), _num(f["tokens_per_s"], ".1f"),
                     _num(f["speedup"], ".2f", "x"), _num(f["mean_speedup"], ".2f", "x"),
                     _num(f["mean_acceptance_length"], ".2f"), _num(f["acceptance_rate"], ".0%"),
                     "-" if m == BASELINE else f"{f['differing_answers']}/{f['questions']}"])
    return format_table(headers, rows, set(range(1, len(headers))), markdown)


def summary_table(summary: dict[str, dict[str, dict]], markdown: bool) -> str:
    """Method x group: speedup over `ar` (mean acceptance length)."""
    scopes = list(summary)
    methods = list(summary["overall"])
    rows = []
    for m in methods:
        rows.append([f"`{m}`" if markdown else m]
                    + [f"{_num(summary[s][m]['speedup'], '.2f', 'x')} ({summary[s][m]['mean_acceptance_length']:.2f})"
                       for s in scopes])
    return format_table(["method", *scopes], rows, set(range(1, len(scopes) + 1)), markdown)


def machine_facts(dtype: str) -> dict:
    import torch

    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
    except OSError:
        cpu = None
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "dtype": dtype, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def print_report(facts: dict, setup: dict, summary: dict, markdown: bool) -> None:
    h = "### " if markdown else ""
    print(f"{h}Spec-Bench: speed and exactness of fastdecode's methods ({setup['model']})\n")
    print(f"Machine: {facts['cpu']}, {facts['cores']} cores (torch threads: {facts['torch_threads']}), "
          f"torch {facts['torch']}, Python {facts['python']}, dtype {facts['dtype']}. Date: {facts['date']}. "
          f"1-min load average: {setup['load_average'][0]:.1f} at start, {setup['load_average'][1]:.1f} at end.  ")
    counts = ", ".join(f"{g} {n}" for g, n in setup["questions_per_group"].items())
    print(f"Questions: {setup['questions_file']}, {setup['per_group'] or 'all'} per group "
          f"(seed {setup['seed']}: {counts}), first turn only, chat template. Greedy, at most "
          f"{setup['max_new_tokens']} new tokens (EOS ends early). Methods interleaved question by question, "
          f"one warm-up each; time = engine wall time per request, prefill included."
          + (" INTERRUPTED: partial results over the completed questions." if setup.get("interrupted") else "") + "\n")
    for scope, figures in summary.items():
        n = next(iter(figures.values()))["questions"]
        print(f"{'#### ' if markdown else ''}{scope} ({n} question{'s' if n != 1 else ''})\n")
        print(group_table(figures, markdown) + "\n")
    print(f"{'#### ' if markdown else ''}Summary: speedup over `ar` (mean acceptance length)\n")
    print(summary_table(summary, markdown))


# ----------------------------------------------------------------------------- running

def choose_methods(spec: str | None, draft_model: str | None) -> list[str]:
    """The methods to run, `ar` first; default: every registered method (`draft` only with a draft model)."""
    from fastdecode.drafters import METHODS, check_method

    if spec:
        names = [m.strip() for m in spec.split(",") if m.strip()]
    else:
        names = [m for m in METHODS if m != "draft" or draft_model]
    methods = [BASELINE] + [m for i, m in enumerate(names) if m != BASELINE and m not in names[:i]]
    for m in methods:
        check_method(m, {})  # unknown names fail here, before the model loads
    if "draft" in methods and not draft_model:
        from fastdecode.errors import FastDecodeError
        raise FastDecodeError("method 'draft' needs --draft-model PATH (a smaller model with the target's tokenizer)")
    return methods


def run_benchmark(llm, questions: list[Question], methods: list[str], options: dict[str, dict],
                  max_new_tokens: int) -> tuple[list[dict], bool]:
    """Every method on every question, interleaved; -> (records, interrupted by Ctrl-C)."""
    from tqdm import tqdm
    from fastdecode import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)
    records: list[dict] = []
    bar = tqdm(total=len(questions) * len(methods), desc="spec-bench", unit="run", file=sys.stderr, dynamic_ncols=True)
    try:
        for q in questions:
            reference = None
            for m in methods:
                bar.set_postfix_str(f"{q.group} q{q.question_id} {m}")  # the run in progress
                r = llm.generate(q.turns[0], params, method=m, **options.get(m, {}))
                ids = list(r.token_ids)
                if m == BASELINE:
                    reference = ids
                s = r.stats
                records.append(dict(question_id=q.question_id, category=q.category, group=q.group, method=m,
                                    num_prompt_tokens=r.num_prompt_tokens, num_tokens=len(ids),
                                    time_s=s.wall_time_s, prefill_time_s=s.prefill_time_s,
                                    forward_passes=s.forward_passes, drafts=s.drafts, draft_tokens=s.draft_tokens,
                                    accepted_tokens=s.accepted_tokens, finish_reason=r.finish_reason,
                                    first_diff=first_difference(ids, reference), token_ids=ids))
                if records[-1]["first_diff"] is not None:
                    tqdm.write(f"DIFFERS: {m} on question {q.question_id} ({q.category}) from token "
                               f"{records[-1]['first_diff']}", file=sys.stderr)
                bar.update()
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: reporting the questions every method completed", file=sys.stderr)
        return records, True
    bar.close()
    return records, False


def main(argv: list[str] | None = None) -> int:
    from fastdecode.models.loader import DEFAULT_DTYPE
    from fastdecode.models.registry import DEFAULT_MODEL

    default_path, why = default_questions_path()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", help=f"Spec-Bench question.jsonl (default: ${ENV_VAR}, else {default_path})")
    ap.add_argument("--per-group", type=int, default=10, help="questions sampled per task group; 0: all (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the question sample (default 0)")
    ap.add_argument("--methods", help="comma list (default: every method; `draft` only with --draft-model); `ar` always runs first")
    ap.add_argument("--draft-model", help="draft model for method `draft`: a registered name, a .gguf file or a folder")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"target model (default {DEFAULT_MODEL})")
    ap.add_argument("--dtype", default=DEFAULT_DTYPE, help=f"float32 or bfloat16 (default {DEFAULT_DTYPE})")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="per answer; EOS ends earlier (default 256)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--json", help="write every raw record and the summary to this file")
    a = ap.parse_args(argv)
    if a.per_group < 0 or a.max_new_tokens < 1:
        ap.error("--per-group takes 0 or more, --max-new-tokens 1 or more")

    from fastdecode.errors import FastDecodeError

    try:
        path = Path(a.questions) if a.questions else default_path
        try:
            questions_all = load_questions(path)
        except QuestionError as exc:
            where = "--questions" if a.questions else why
            raise FastDecodeError(f"{exc} (from {where}; pass --questions PATH or set ${ENV_VAR})"
                                  if "not found" in str(exc) else str(exc)) from None
        sampled = sample_questions(group_questions(questions_all), a.per_group, a.seed)
        questions = [q for qs in sampled.values() for q in qs]
        methods = choose_methods(a.methods, a.draft_model)
        options = {"draft": {"draft_model": a.draft_model}} if a.draft_model else {}

        from fastdecode import LLM, SamplingParams

        load_before = os.getloadavg()[0]
        print(f"loading {a.model} ({a.dtype}); {len(questions)} questions x {len(methods)} methods "
              f"({', '.join(methods)})", file=sys.stderr)
        llm = LLM(a.model, a.dtype)
        warm = SamplingParams(max_new_tokens=WARMUP_TOKENS)
        for m in methods:  # also builds each drafter (a draft model loads here) and the cost curve
            t = time.perf_counter()
            llm.generate(WARMUP_PROMPT, warm, method=m, **options.get(m, {}))
            print(f"warm-up {m}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        records, interrupted = run_benchmark(llm, questions, methods, options, a.max_new_tokens)
    except FastDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not any(r["method"] == methods[-1] for r in records):
        print("error: no question completed", file=sys.stderr)
        return 130 if interrupted else 1

    summary = summarize(records, methods)
    facts = machine_facts(a.dtype)
    setup = dict(model=llm.model_name, questions_file=str(path), per_group=a.per_group, seed=a.seed,
                 max_new_tokens=a.max_new_tokens, methods=methods, method_options=options,
                 questions_per_group={g: len(qs) for g, qs in sampled.items()},
                 load_average=[load_before, os.getloadavg()[0]], interrupted=interrupted)
    print_report(facts, setup, summary, a.markdown)
    differing = summary["overall"]
    bad = {m: f["differing_answers"] for m, f in differing.items() if f["differing_answers"]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=facts, setup=setup, summary=summary, records=records), f, indent=1)
        print(f"saved {a.json}", file=sys.stderr)
    if bad:
        print(f"greedy answers differing from ar: {', '.join(f'{m} {n}' for m, n in bad.items())}", file=sys.stderr)
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
