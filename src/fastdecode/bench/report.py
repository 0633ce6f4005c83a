"""The files a benchmark run leaves in its output folder, and the tables it prints.

results.jsonl  one raw record per answer (written as each answer completes: an interrupted run keeps them)
summary.json   machine, setup, skipped peers, figures per task group and method, this machine's cost curve
report.md      the tables (a summary table, then one per task group) and the plots
*.png          see plots.py
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from ..runtime.cost_curve import CostCurve
from .stats import BASELINE

RED, RESET = "\033[31m", "\033[0m"


class ResultsFile:
    """results.jsonl, appended and flushed one record at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_results(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def machine_facts(dtype: str) -> dict:
    import torch

    from ..kernels import kernel_description

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        cpu = None
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "dtype": dtype, "kernels": kernel_description(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ----------------------------------------------------------------------------- cells

def number(x: float | None, spec: str, suffix: str = "") -> str:
    """A figure formatted, or "-" where there is none."""
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _mean_std(x: dict, spec: str, suffix: str = "") -> str:
    if x["mean"] is None:
        return "-"
    return number(x["mean"], spec, suffix) + ("" if x["std"] is None else f" ± {x['std']:{spec}}")


def exactness_cell(method: str, f: dict, markdown: bool) -> str:
    if f["reference"] is None:
        return "baseline" if method == BASELINE else "own baseline"
    if f["differing_answers"] is None:
        return "n/a (sampling)"
    n, total = f["differing_answers"], f["answers"]
    if not n:
        return f"{total}/{total} equal `{f['reference']}`" if markdown else f"{total}/{total} equal {f['reference']}"
    first = min(d["position"] for d in f["first_differences"])
    text = f"{n}/{total} differ from {f['reference']} (first at token {first})"
    return f"🔴 **{text}**" if markdown else f"{RED}{text}{RESET}"


def format_table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    """Markdown, or plain columns; every column but the first right-aligned."""
    if markdown:
        rule = ["---"] + ["---:"] * (len(headers) - 1)
        return "\n".join("| " + " | ".join(r) + " |" for r in [headers, rule, *rows])
    visible = lambda c: len(c.replace(RED, "").replace(RESET, ""))  # noqa: E731
    widths = [max(visible(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    pad = lambda c, w, i: c + " " * (w - visible(c)) if i == 0 else " " * (w - visible(c)) + c  # noqa: E731
    lines = ["  ".join(pad(c, w, i) for i, (c, w) in enumerate(zip(r, widths))) for r in [headers, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ----------------------------------------------------------------------------- tables

DEFINITIONS = """\
- **tokens/s**: new tokens / wall time over the group's answers (mean ± standard deviation over repeats).
- **speedup**: that rate over `ar`'s on the same answers; **mean per-answer speedup**: the mean of each answer's ratio.
- **mean acceptance length**: 1 + accepted / drafts, tokens kept per verification step that had a draft.
- **acceptance rate**: accepted / drafted tokens; **acceptance at positions 1-4**: share of drafts whose token at that depth was accepted.
- **exactness**: greedy answers equal to the reference's token for token (`ar` for fastdecode's methods; transformers' and
  llama.cpp's speculative modes against their own plain decoding, which is their *own baseline*)."""

def label(method: str, lossy: list[str], markdown: bool) -> str:
    name = f"`{method}`" if markdown else method
    return f"{name} (LOSSY)" if method in lossy else name


def summary_table(scopes: dict[str, dict[str, dict]], lossy: list[str], markdown: bool) -> str:
    """Method x task group: speedup over `ar` (mean acceptance length)."""
    names = list(scopes)
    rows = []
    for m, overall in scopes["overall"].items():
        cells = []
        for s in names:
            f = scopes[s][m]
            mal = f["mean_acceptance_length"]
            cells.append(number(f["speedup"]["mean"], ".2f", "x") + ("" if mal is None else f" ({mal:.2f})"))
        rows.append([label(m, lossy, markdown), *cells, exactness_cell(m, overall, markdown)])
    return format_table(["method", *names, "exactness"], rows, markdown)


def scope_table(figures: dict[str, dict], lossy: list[str], markdown: bool) -> str:
    """One task group: every figure of every method."""
    headers = ["method", "tokens", "tokens/s", "speedup", "mean per-answer speedup", "mean acceptance length",
               "acceptance rate", "acceptance at positions 1-4", "exactness"]
    rows = []
    for m, f in figures.items():
        positions = " ".join(f"{p:.2f}" for p in f["acceptance_per_position"][:4]) or "-"
        rows.append([label(m, lossy, markdown), str(f["tokens"]), _mean_std(f["tokens_per_s"], ".1f"),
                     _mean_std(f["speedup"], ".2f", "x"), _mean_std(f["mean_speedup"], ".2f", "x"),
                     number(f["mean_acceptance_length"], ".2f"), number(f["acceptance_rate"], ".0%"), positions,
                     exactness_cell(m, f, markdown)])
    return format_table(headers, rows, markdown)


def setup_lines(summary: dict) -> list[str]:
    m, s = summary["machine"], summary["setup"]
    counts = ", ".join(f"{g} {n}" for g, n in s["questions_per_group"].items())
    decoding = "greedy" if s["temperature"] == 0 else f"sampling at temperature {s['temperature']}"
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), torch {m['torch']}, "
        f"Python {m['python']}, dtype {m['dtype']}, {m.get('kernels', 'kernels not recorded')}. Date: {m['date']}. "
        f"Load average (1 min): {s['load_average'][0]:.1f} at start, {s['load_average'][1]:.1f} at end.",
        f"Questions: {s['questions_file']}: {s['questions']} questions ({counts}; "
        f"{'all' if not s['per_group'] else s['per_group']} per group, seed {s['seed']}), {s['answers_per_repeat']} answers "
        f"per contender and repeat (every turn; later turns hear the contender's own answers).",
        f"Decoding: {decoding}, at most {s['max_new_tokens']} new tokens (EOS ends earlier), {s['repeats']} repeat(s). "
        f"Time: wall time of each generate call, prefill included; tokens: generated ids, EOS included, for every contender.",
    ]
    if summary.get("cost_curve"):
        lines.append(curve_line(summary["cost_curve"]))
    if summary["skipped"]:
        lines.append("Skipped: " + "; ".join(f"{name}: {why}" for name, why in summary["skipped"].items()) + ".")
    if s.get("interrupted"):
        lines.append("INTERRUPTED: the figures cover the answers every contender completed.")
    return lines


CEILING_RATES = (0.6, 0.8, 0.9, 1.0)


def curve_line(curve: dict) -> str:
    """The run's cost curve in short, with the ceiling it sets (CostCurve.ceiling): what the speedups
    above can be measured against on this machine."""
    c = CostCurve(curve["sizes"], curve["seconds"])
    steps = ", ".join(f"{n} tokens {c.cost(n) / c.cost(1):.2f}x" for n in (2, 4, 8))
    ceilings = ", ".join(f"{a:.0%} {c.ceiling(a)[0]:.2f}x" for a in CEILING_RATES)
    return (f"Cost curve: 1 token {c.cost(1) * 1000:.1f} ms, {steps}. Its ceiling for drafts that cost nothing, by "
            f"the share accepted (see `fastdecode calibrate`): {ceilings}.")


def write_report(summary: dict, plots: list[Path], path: Path) -> None:
    scopes = summary["scopes"]
    parts = [f"# fastdecode bench: {summary['setup']['model']}", "", *[f"{l}  " for l in setup_lines(summary)], "",
             "## Speedup over `ar` (mean acceptance length)", "", summary_table(scopes, summary["lossy"], True), ""]
    for scope, figures in scopes.items():
        first = next(iter(figures.values()))
        n, answers = first["questions"], first["answers"]
        parts += [f"## {scope} ({n} question{'s' * (n != 1)}, {answers} answer{'s' * (answers != 1)} per contender)", "",
                  scope_table(figures, summary["lossy"], True), ""]
    parts += ["## Definitions", "", DEFINITIONS, ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path.write_text("\n".join(parts), encoding="utf-8")


def write_summary(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=1), encoding="utf-8")


def print_summary(summary: dict, color: bool) -> None:
    """The main table on stdout (plain columns)."""
    table = summary_table(summary["scopes"], summary["lossy"], markdown=False)
    if not color:
        table = table.replace(RED, "").replace(RESET, "")
    print("\n".join(setup_lines(summary)) + "\n\nspeedup over ar (mean acceptance length)\n" + table)
