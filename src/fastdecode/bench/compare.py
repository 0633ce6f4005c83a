"""`fastdecode bench --compare A B`: two result folders side by side, as a regression check.

Per method (and peer) found in both: tokens/s, speedup over `ar` and mean acceptance length in A and
in B, the change, the answers whose differences from their reference grew, and how many answers
changed between the two runs (greedy runs on the same questions should give the same token ids).
A regression is a contender whose greedy answers differ from its reference in B more often than in A;
speed changes are shown but not judged, since they swing with machine load.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import FastDecodeError
from .report import RED, RESET, format_table, number, read_results
from .stats import answer_key


def load_folder(folder: Path) -> tuple[dict, list[dict]]:
    summary_path, results_path = folder / "summary.json", folder / "results.jsonl"
    if not summary_path.is_file():
        raise FastDecodeError(f"{folder} is not a `fastdecode bench` result folder: no summary.json in it")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        records = read_results(results_path) if results_path.is_file() else []
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FastDecodeError(f"{folder}: unreadable result file ({exc})") from None
    return summary, records


def changed_answers(a: list[dict], b: list[dict], method: str) -> tuple[int, int]:
    """(answers whose token ids differ between the runs, answers both runs gave) for one method."""
    ids_a = {answer_key(r): r["token_ids"] for r in a if r["method"] == method}
    common = [(ids_a[answer_key(r)], r["token_ids"]) for r in b if r["method"] == method and answer_key(r) in ids_a]
    return sum(x != y for x, y in common), len(common)


def _change(a: float | None, b: float | None) -> str:
    return "-" if not a or b is None else f"{(b / a - 1) * 100:+.1f}%"


def compare(folder_a: Path, folder_b: Path, color: bool = False) -> tuple[str, int]:
    """The comparison as text, and the number of regressions."""
    (sa, ra), (sb, rb) = load_folder(folder_a), load_folder(folder_b)
    fa, fb = sa["scopes"]["overall"], sb["scopes"]["overall"]
    greedy = sa["setup"]["temperature"] == 0 and sb["setup"]["temperature"] == 0
    rows, regressions = [], 0
    for m in [m for m in fa if m in fb]:
        a, b = fa[m], fb[m]
        da, db = a["differing_answers"], b["differing_answers"]
        worse = db is not None and db > (da or 0)
        regressions += worse
        exact = f"{number(da, 'd')} -> {number(db, 'd')}" + (" REGRESSION" if worse else "")
        if worse and color:
            exact = f"{RED}{exact}{RESET}"
        changed, common = changed_answers(ra, rb, m)
        rows.append([m, number(a["tokens_per_s"]["mean"], ".1f"), number(b["tokens_per_s"]["mean"], ".1f"),
                     _change(a["tokens_per_s"]["mean"], b["tokens_per_s"]["mean"]),
                     number(a["speedup"]["mean"], ".2f"), number(b["speedup"]["mean"], ".2f"),
                     number(a["mean_acceptance_length"], ".2f"), number(b["mean_acceptance_length"], ".2f"),
                     exact, f"{changed}/{common}" if greedy and common else "-"])
    headers = ["method", "tok/s A", "tok/s B", "change", "speedup A", "speedup B", "accept len A", "accept len B",
               "differing answers A -> B", "answers changed A vs B"]
    lines = [f"A: {folder_a} ({sa['machine']['date']}, {sa['setup']['model']}, {sa['machine']['dtype']})",
             f"B: {folder_b} ({sb['machine']['date']}, {sb['setup']['model']}, {sb['machine']['dtype']})"]
    if sa["setup"].get("questions_file") != sb["setup"].get("questions_file") or \
            sa["setup"]["max_new_tokens"] != sb["setup"]["max_new_tokens"]:
        lines.append("warning: the runs used different questions or token limits; figures are not comparable")
    only = sorted(set(fa) ^ set(fb))
    lines += ["", format_table(headers, rows, markdown=False)]
    if only:
        lines.append(f"\nin one run only: {', '.join(only)}")
    lines.append(f"\n{regressions} regression(s): contenders whose greedy answers differ from their reference more often in B")
    return "\n".join(lines), regressions
