"""The bench figures: which files are written, what each figure draws, and that every method keeps
one color in every figure. Hand-made summaries, no model."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from matplotlib.colors import to_hex
from PIL import Image

from fastdecode.bench.plots import (
    DIFFERS, DPI, acceptance_length_figure, acceptance_per_position_figure, cost_curve_figure,
    histogram_methods, method_colors, position_methods, speedup_figure, task_groups, write_plots,
)

GROUPS = ["mt_bench", "translation", "qa"]
SPEEDUPS = {  # per group then overall; hf has one repeat (std None) and no speedup on qa
    "ngram": [(1.48, 0.03), (1.9, 0.05), (1.2, 0.02), (1.5, 0.03)],
    "auto": [(1.7, 0.04), (2.1, 0.06), (1.3, 0.01), (1.7, 0.04)],
    "hf": [(0.33, None), (0.4, None), (None, None), (0.36, None)],
}


def record(speedup=(1.0, 0.0), hist=None, positions=None, mal=None, differing=None):
    return {"questions": 10, "answers": 20, "tokens": 4800, "time_s": 88.1,
            "tokens_per_s": {"mean": 54.5, "std": 1.2}, "speedup": {"mean": speedup[0], "std": speedup[1]},
            "mean_acceptance_length": mal, "acceptance_rate": None,
            "acceptance_per_position": positions or [], "accepted_length_histogram": hist or {},
            "reference": None if differing is None else "ar", "differing_answers": differing, "first_differences": []}


def make_summary() -> dict:
    scopes = {}
    for g, group in enumerate(GROUPS + ["overall"]):
        scopes[group] = {
            "ar": record(mal=1.0),
            "ngram": record(SPEEDUPS["ngram"][g], {"1": 300, "2": 120, "3": 60, "5": 20}, [0.62, 0.45, 0.33, 0.2, 0.1],
                            2.26, differing=0),
            "auto": record(SPEEDUPS["auto"][g], {"1": 100, "2": 100}, [0.5, 0.3, 0.1], 1.5,
                           differing=2 if group in ("qa", "overall") else 0),
            "hf": record(SPEEDUPS["hf"][g]),
        }
    return {
        "machine": {"cpu": "AMD EPYC 9R14", "cores": 2, "torch": "2.13.0", "dtype": "bfloat16",
                    "date": "2026-11-23 03:10 UTC"},
        "setup": {"model": "smollm2-135m-instruct", "max_new_tokens": 256, "repeats": 2, "temperature": 0.0},
        "methods": ["ar", "ngram", "auto", "hf"],
        "skipped": {"llamacpp": "not installed"},
        "scopes": scopes,
        "cost_curve": {"sizes": [1, 2, 4, 8, 16, 32, 64],
                       "seconds": [0.017, 0.018, 0.019, 0.023, 0.032, 0.051, 0.090]},
    }


@pytest.fixture
def summary():
    return make_summary()


def png_size(path):
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000  # a drawn figure, not an empty canvas
    with Image.open(path) as img:
        img.load()
        return img.size


def test_write_plots_returns_the_four_pngs_in_order(summary, tmp_path):
    paths = write_plots(summary, tmp_path)
    assert [p.name for p in paths] == ["speedup.png", "acceptance_length.png", "acceptance_per_position.png",
                                       "cost_curve.png"]
    assert all(p.parent == tmp_path for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    expected = {  # figure inches * DPI
        "speedup.png": (10 * DPI, round(5.5 * DPI)),
        "acceptance_length.png": (10 * DPI, round(5.5 * DPI)),  # two panels side by side
        "acceptance_per_position.png": (10 * DPI, round(5.5 * DPI)),
        "cost_curve.png": (10 * DPI, round(5.5 * DPI)),
    }
    for p in paths:
        assert png_size(p) == expected[p.name], p.name


@pytest.mark.parametrize("drop", ["none", "missing"])
def test_without_cost_curve_three_plots(summary, tmp_path, drop):
    if drop == "none":
        summary["cost_curve"] = None
    else:
        del summary["cost_curve"]
    paths = write_plots(summary, tmp_path)
    assert [p.name for p in paths] == ["speedup.png", "acceptance_length.png", "acceptance_per_position.png"]
    assert not (tmp_path / "cost_curve.png").exists()
    for p in paths:
        png_size(p)


def test_methods_to_draw(summary):
    assert task_groups(summary) == GROUPS + ["overall"]
    # "overall" goes last even where the summary lists it first
    summary["scopes"] = {"overall": summary["scopes"]["overall"], **{g: summary["scopes"][g] for g in GROUPS}}
    assert task_groups(summary) == GROUPS + ["overall"]
    # ar and hf have empty histograms / positions: left out; summary order kept
    assert histogram_methods(summary) == ["ngram", "auto"]
    assert position_methods(summary) == ["ngram", "auto"]
    summary["scopes"]["overall"]["ngram"]["accepted_length_histogram"] = {"1": 0}
    assert histogram_methods(summary) == ["auto"]


def bar_colors(ax):
    return {to_hex(c.get_facecolor()) for c in ax.containers[0]} if ax.containers else set()


def test_speedup_figure(summary):
    fig = speedup_figure(summary)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mt bench", "translation", "qa", "overall"]
    assert ax.get_ylabel() == "speedup over ar (× tokens/s)"
    assert "smollm2-135m-instruct" in ax.get_title() and "2026-11-23" in ax.get_title()
    # one bar series per method but ar; hf has no bar where its speedup is None
    bars = {c.get_label(): c for c in ax.containers if hasattr(c, "patches")}
    assert set(bars) == {"ngram", "auto" + DIFFERS, "hf"}
    assert [p.get_height() for p in bars["ngram"].patches] == pytest.approx([s for s, _ in SPEEDUPS["ngram"]])
    assert [p.get_height() for p in bars["hf"].patches] == pytest.approx([0.33, 0.4, 0.36])
    assert any(t.get_text() == "n/a" for t in ax.texts)
    # error bars only where std is known
    assert bars["ngram"].errorbar is not None and bars["hf"].errorbar is None
    # the baseline: a dashed line at 1.0
    (baseline,) = [ln for ln in ax.get_lines() if ln.get_label() == "ar (plain decoding)"]
    assert list(baseline.get_ydata()) == [1.0, 1.0] and baseline.get_linestyle() == "--"
    # legend: the differing method in red, the others not
    legend = {t.get_text(): t.get_color() for t in ax.get_legend().get_texts()}
    assert legend["auto" + DIFFERS] == "red"
    assert legend["ngram"] != "red" and "ar (plain decoding)" in legend


def test_acceptance_length_figure_is_normalised(summary):
    fig = acceptance_length_figure(summary)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["ngram (mean 2.26)", "auto (mean 1.50)"]
    ngram_heights = [p.get_height() for p in panels[0].patches]
    assert ngram_heights == pytest.approx([0.6, 0.24, 0.12, 0.0, 0.04])  # 1, 2, 3, (4 missing), 5
    assert sum(p.get_height() for p in panels[1].patches) == pytest.approx(1.0)
    assert fig.get_supxlabel() == "tokens kept per verification step"
    assert fig.get_supylabel() == "share of steps"


def test_acceptance_per_position_figure(summary):
    ax = acceptance_per_position_figure(summary).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"ngram", "auto" + DIFFERS}
    assert list(lines["ngram"].get_xdata()) == [1, 2, 3, 4, 5]
    assert list(lines["ngram"].get_ydata()) == [0.62, 0.45, 0.33, 0.2, 0.1]
    assert lines["ngram"].get_marker() == "o"
    assert ax.get_xlabel() and ax.get_ylabel()
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 1.0


def test_no_acceptance_statistics_still_writes_a_figure(summary, tmp_path):
    summary["methods"] = ["ar", "hf"]
    fig = acceptance_length_figure(summary)
    assert any("no method" in t.get_text() for t in fig.axes[0].texts)
    assert len(write_plots(summary, tmp_path)) == 4


def test_cost_curve_figure(summary):
    ax = cost_curve_figure(summary).axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1, 2, 4, 8, 16, 32, 64]
    assert list(line.get_ydata()) == pytest.approx([17, 18, 19, 23, 32, 51, 90])
    assert ax.get_xlabel() == "tokens in one forward (draft + 1)"
    assert ax.get_ylabel() == "forward latency (ms)"
    for part in ("smollm2-135m-instruct", "bfloat16", "AMD EPYC 9R14"):
        assert part in ax.get_title()
    (right,) = ax.child_axes
    assert right.get_ylabel() == "× one-token forward"
    assert "×5.29" in [t.get_text() for t in ax.texts]  # 90 ms / 17 ms


def test_same_method_same_color_everywhere(summary):
    colors = method_colors(summary)
    assert len(set(colors.values())) == len(colors)
    speed = speedup_figure(summary).axes[0]
    by_label = {c.get_label().removesuffix(DIFFERS): {to_hex(p.get_facecolor()) for p in c.patches}
                for c in speed.containers if hasattr(c, "patches")}
    hist_panels = [ax for ax in acceptance_length_figure(summary).axes if ax.get_visible()]
    lines = {ln.get_label().removesuffix(DIFFERS): to_hex(ln.get_color())
             for ln in acceptance_per_position_figure(summary).axes[0].get_lines()}
    for m, ax in zip(["ngram", "auto"], hist_panels):
        assert by_label[m] == {colors[m]} == bar_colors(ax) == {lines[m]}
    # colors follow summary["methods"], not which figure draws the method
    assert colors["hf"] not in (colors["ngram"], colors["auto"])


def test_many_methods_grow_the_figures(summary, tmp_path):
    many = copy.deepcopy(summary)
    extra = ["suffix", "lookahead", "recycling", "tree", "draft-model"]
    many["methods"] += extra
    for scope in many["scopes"].values():
        for m in extra:
            scope[m] = copy.deepcopy(scope["ngram"])
    assert len(set(method_colors(many).values())) == 9
    paths = write_plots(many, tmp_path)
    wide, _ = png_size(paths[0])
    assert wide > 10 * DPI  # more bars: a wider speedup figure
    hist = acceptance_length_figure(many)
    assert len([ax for ax in hist.axes if ax.get_visible()]) == 7


def test_import_does_not_load_matplotlib():
    code = "import sys, fastdecode.bench.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_report_states_the_cost_curve_and_its_ceiling(summary):
    from fastdecode.bench.report import curve_line
    from fastdecode.runtime.cost_curve import CostCurve

    line = curve_line(summary["cost_curve"])
    assert line.startswith("Cost curve: 1 token 17.0 ms, 2 tokens 1.06x, 4 tokens 1.12x, 8 tokens 1.35x.")
    curve = CostCurve(**summary["cost_curve"])
    assert f"100% {curve.ceiling(1.0)[0]:.2f}x." in line and f"80% {curve.ceiling(0.8)[0]:.2f}x," in line
