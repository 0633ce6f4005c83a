"""PNG figures of a bench summary (the dict saved as summary.json): speedup per task group,
acceptance-length histograms, per-position acceptance and this machine's forward cost curve.

matplotlib is imported only when a figure is drawn, so importing this module stays cheap. Figures
are built with `matplotlib.figure.Figure` (Agg backend, no pyplot, no global state); every method
keeps one color in every figure.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import stats
from .stats import BASELINE

DPI = 120
STYLE = {"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10, "grid.alpha": 0.35,
         "grid.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False}
BASELINE_COLOR = "#555555"
# tab10 without its gray (kept for the baseline), then the light tab20 variants.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
           "#dbdb8d", "#9edae5"]
DIFFERS = " (output differs!)"


# ---------------------------------------------------------------- what to draw

def method_colors(summary: dict) -> dict[str, str]:
    """One color per method, from its place in summary["methods"]: the same in every figure."""
    others = [m for m in summary.get("methods", []) if m != BASELINE]
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(others)}
    colors[BASELINE] = BASELINE_COLOR
    return colors


def task_groups(summary: dict) -> list[str]:
    """Scopes in summary order, with "overall" moved last."""
    scopes = list(summary.get("scopes", {}))
    return [s for s in scopes if s != "overall"] + (["overall"] if "overall" in scopes else [])


def speedup_methods(summary: dict) -> list[str]:
    return [m for m in summary.get("methods", []) if m != BASELINE]


def _overall(summary: dict, method: str) -> dict:
    return (summary.get("scopes", {}).get("overall") or {}).get(method) or {}


def differing_methods(summary: dict) -> set[str]:
    """Methods whose output differed from their reference (scope "overall" holds every answer)."""
    return set(stats.differing_methods(summary["scopes"]["overall"]))


def histogram_methods(summary: dict) -> list[str]:
    """Methods with a non-empty acceptance-length histogram in scope "overall"."""
    return [m for m in summary.get("methods", [])
            if any(c for c in (_overall(summary, m).get("accepted_length_histogram") or {}).values())]


def position_methods(summary: dict) -> list[str]:
    """Methods with per-position acceptance in scope "overall"."""
    return [m for m in summary.get("methods", [])
            if any(v is not None for v in _overall(summary, m).get("acceptance_per_position") or [])]


def _title(summary: dict, what: str) -> str:
    setup, machine = summary.get("setup", {}), summary.get("machine", {})
    parts = [setup.get("model"), machine.get("date")]
    return what + " — " + ", ".join(str(p) for p in parts if p) if any(parts) else what


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _empty_figure(summary: dict, what: str, why: str):
    fig = _figure((10.0, 5.5))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=14, color="#555555", transform=ax.transAxes)
    ax.set_title(_title(summary, what))
    return fig


def _red_differs(legend) -> None:
    for text in legend.get_texts():
        if text.get_text().endswith(DIFFERS):
            text.set_color("red")


def _mean_std(stat) -> tuple[float | None, float | None]:
    if isinstance(stat, dict):
        return stat.get("mean"), stat.get("std")
    return stat, None


# ---------------------------------------------------------------- figures

def speedup_figure(summary: dict):
    """Grouped bars: speedup over plain decoding per task group (x) and method (bars)."""
    groups, methods = task_groups(summary), speedup_methods(summary)
    colors, differs = method_colors(summary), differing_methods(summary)
    bars = len(groups) * max(len(methods), 1)
    fig = _figure((min(16.0, max(10.0, 4.5 + 0.25 * bars)), 5.5 if bars <= 40 else 6.5))
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    missing = []
    for i, m in enumerate(methods):
        xs, ys, errs = [], [], []
        for g, group in enumerate(groups):
            x = g + (i - (len(methods) - 1) / 2) * width
            mean, std = _mean_std((summary["scopes"][group].get(m) or {}).get("speedup"))
            if mean is None:
                missing.append((x, m))
                continue
            xs.append(x)
            ys.append(mean)
            errs.append(std if std is not None else 0.0)
        ax.bar(xs, ys, width * 0.92, color=colors[m], label=m + (DIFFERS if m in differs else ""),
               yerr=errs if any(errs) else None, capsize=3, error_kw={"elinewidth": 1, "ecolor": "#333333"},
               zorder=2)
    for x, m in missing:  # a None speedup: no bar, marked on the axis
        ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=10, color=colors[m],
                transform=ax.get_xaxis_transform())
    ax.axhline(1.0, color=BASELINE_COLOR, linestyle="--", linewidth=1.2, label="ar (plain decoding)", zorder=3)
    if "overall" in groups and len(groups) > 1:
        ax.axvline(len(groups) - 1.5, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g in groups])
    for label, g in zip(ax.get_xticklabels(), groups):
        if g == "overall":
            label.set_fontweight("bold")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, None)
    ax.set_ylabel("speedup over ar (× tokens/s)")
    ax.set_xlabel("task group")
    ax.grid(axis="y", zorder=0)
    ax.set_axisbelow(True)
    ax.set_title(_title(summary, "Speedup over plain decoding"))
    _red_differs(ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="method"))
    return fig


def acceptance_length_figure(summary: dict):
    """Small multiples: share of verification steps that kept 1, 2, 3, ... tokens, per method."""
    methods, colors = histogram_methods(summary), method_colors(summary)
    if not methods:
        return _empty_figure(summary, "Acceptance length", "no method with an acceptance-length histogram")
    cols = {1: 1, 2: 2, 3: 3, 4: 2, 5: 3, 6: 3}.get(len(methods), 4)
    rows = math.ceil(len(methods) / cols)
    fig = _figure((10.0 if cols <= 3 else 13.0, max(5.5, 3.0 * rows + 1.0)))
    hists = {m: {int(k): c for k, c in _overall(summary, m)["accepted_length_histogram"].items()}
             for m in methods}
    top = max(max(h) for h in hists.values())
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, m in zip(axes, methods):
        hist = hists[m]
        total = sum(hist.values())
        ks = list(range(1, top + 1))
        ax.bar(ks, [hist.get(k, 0) / total for k in ks], 0.8, color=colors[m], zorder=2)
        mean = _overall(summary, m).get("mean_acceptance_length")
        if mean is None:
            mean = sum(k * c for k, c in hist.items()) / total
        ax.set_title(f"{m} (mean {mean:.2f})")
        ax.grid(axis="y", zorder=0)
        ax.set_xticks(ks if top <= 16 else range(1, top + 1, math.ceil(top / 12)))
        ax.tick_params(labelbottom=True, labelleft=True)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    fig.supxlabel("tokens kept per verification step")
    fig.supylabel("share of steps")
    fig.suptitle(_title(summary, "Acceptance length (accepted draft tokens + 1)"))
    return fig


def acceptance_per_position_figure(summary: dict):
    """One line per method: share of drafts whose token at depth k was accepted."""
    methods, colors, differs = position_methods(summary), method_colors(summary), differing_methods(summary)
    if not methods:
        return _empty_figure(summary, "Acceptance per draft position", "no method with per-position acceptance")
    fig = _figure((10.0, 5.5))
    ax = fig.add_subplot()
    top = 1
    for m in methods:
        ys = [math.nan if v is None else v for v in _overall(summary, m)["acceptance_per_position"]]
        xs = list(range(1, len(ys) + 1))
        top = max(top, len(ys))
        ax.plot(xs, ys, marker="o", color=colors[m], label=m + (DIFFERS if m in differs else ""), linewidth=1.8)
    ax.set_xticks(range(1, top + 1) if top <= 16 else range(1, top + 1, math.ceil(top / 12)))
    ax.set_xlim(0.7, top + 0.3)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("draft position (depth of the drafted token)")
    ax.set_ylabel("share of drafts accepted at this depth")
    ax.grid(True)
    ax.set_title(_title(summary, "Acceptance per draft position"))
    _red_differs(ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="method"))
    return fig


def cost_curve_figure(summary: dict):
    """Forward latency (ms) versus tokens in one forward; right axis: relative to one token."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    curve = summary["cost_curve"]
    sizes, ms = list(curve["sizes"]), [s * 1000.0 for s in curve["seconds"]]
    base = ms[sizes.index(1)] if 1 in sizes else ms[0]
    fig = _figure((10.0, 5.5))
    ax = fig.add_subplot()
    ax.plot(sizes, ms, marker="o", color="#1f77b4", linewidth=2, zorder=3)
    for i, (n, t) in enumerate(zip(sizes, ms)):  # below right of a rising curve; the last one left
        last = i == len(sizes) - 1
        ax.annotate(f"×{t / base:.2f}", (n, t), textcoords="offset points", xytext=(-10, 0) if last else (6, -8),
                    ha="right" if last else "left", va="center" if last else "top", fontsize=10, color="#444444")
    if sizes and min(sizes) > 0 and max(sizes) / min(sizes) >= 8:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(0, max(ms) * 1.12)
    ax.set_xlabel("tokens in one forward (draft + 1)")
    ax.set_ylabel("forward latency (ms)")
    right = ax.secondary_yaxis("right", functions=(lambda y: y / base, lambda r: r * base))
    right.set_ylabel("× one-token forward")
    ax.grid(True)
    machine = summary.get("machine", {})
    cpu = machine.get("cpu")
    if cpu and machine.get("cores"):
        cpu = f"{cpu} ({machine['cores']} cores)"
    parts = [summary.get("setup", {}).get("model"), machine.get("dtype"), cpu]
    ax.set_title("Forward latency vs tokens per forward — " + ", ".join(str(p) for p in parts if p))
    return fig


def write_plots(summary: dict, out_dir: Path) -> list[Path]:
    """Write the figures of `summary` as PNGs into `out_dir` (which exists) and return their paths:
    speedup, acceptance_length, acceptance_per_position, cost_curve (only with a cost curve).
    An acceptance figure with no method to show says so instead of being left out."""
    import matplotlib

    out_dir = Path(out_dir)
    figures = [("speedup.png", speedup_figure), ("acceptance_length.png", acceptance_length_figure),
               ("acceptance_per_position.png", acceptance_per_position_figure)]
    curve = summary.get("cost_curve")
    if curve and curve.get("sizes") and curve.get("seconds"):
        figures.append(("cost_curve.png", cost_curve_figure))
    paths = []
    with matplotlib.rc_context(STYLE):
        for name, draw in figures:
            fig = draw(summary)
            fig.savefig(out_dir / name, dpi=DPI)
            paths.append(out_dir / name)
    return paths
