"""Tests of iddpm.viz_evaluation (chapter 9's figures): built from small synthetic results, no files, fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from iddpm import viz_evaluation as vze  # noqa: E402


def _stat(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    se = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.1
    return {"mean": mean, "se": se, "n": n, "values": values}


def _results() -> dict:
    summary = {
        "linear": {
            "nll": _stat([6.1, 6.2, 6.0]),
            "skip": [
                {"skip": 0.0, "fid": _stat([10.0, 11.0, 12.0]), "recall": _stat([0.8, 0.7, 0.75])},
                {"skip": 0.2, "fid": _stat([11.0, 12.0, 13.0]), "recall": _stat([0.6, 0.65, 0.7])},
            ],
        },
        "cosine": {
            "nll": _stat([5.5, 5.6, 5.4]),
            "skip": [
                {"skip": 0.0, "fid": _stat([9.0, 9.5, 10.0]), "recall": _stat([0.85, 0.8, 0.8])},
                {"skip": 0.2, "fid": _stat([14.0, 15.0, 16.0]), "recall": _stat([0.5, 0.55, 0.6])},
            ],
        },
    }
    return {
        "experiment": "a_schedule",
        "claim": "a",
        "title": "Linear vs cosine",
        "scale": "cpu",
        "summary": summary,
        "verdict": {
            "verdict": "partly",
            "held": 1,
            "of": 2,
            "checks": [
                {"check": "held-out NLL: cosine < linear", "holds": True, "difference": 0.6, "se": 0.1,
                 "z": 6.0},
                {"check": "a slope check", "holds": False, "difference": -0.01, "se": None, "z": None},
            ],
        },
    }  # fmt: skip


def _scaling() -> dict:
    summary = {}
    for arm, params, base in (("w16", 2e5, 30.0), ("w32", 8e5, 20.0)):
        curve = [
            {"step": s, "train_flops": f, "fid": _stat([base / s**0.3]), "bpd": _stat([2.0 - 0.01 * s / 400])}
            for s, f in ((400, params * 1e4), (800, params * 2e4))
        ]
        summary[arm] = {"curve": curve, "params": params}
    return {
        "summary": summary,
        "fits": {
            "fid_vs_flops": {"slope": -0.3, "intercept": 3.0, "r2": 0.9},
            "bpd_vs_flops": {"slope": -0.01, "intercept": 0.4, "r2": 0.5},
        },
    }


def _width_px(fig) -> float:
    return fig.get_figwidth() * fig.dpi


def test_verdict_lines_lists_every_check():
    lines = vze.verdict_lines(_results())
    assert lines[0].startswith("claim a (Linear vs cosine), cpu scale: partly (1 of 2 checks hold)")
    assert lines[1] == "  [holds] held-out NLL: cosine < linear: difference 0.6 (se 0.1, z = 6.00)"
    assert lines[2] == "  [fails] a slope check: difference -0.01"
    assert len(lines) == 3


def test_plot_arm_nll_bars_dots_and_labels():
    fig = vze.plot_arm_nll(_results(), arms=["cosine", "linear"], labels={"cosine": "cos"})
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([5.5, 6.1])
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["cos\n(n=3)", "linear\n(n=3)"]
    dots = [line for line in ax.lines if line.get_linestyle() == "None" and len(line.get_xdata()) == 3]
    assert len(dots) == 2  # every seed drawn as a dot
    lo, hi = ax.get_ylim()
    assert lo < 5.4 and hi > 6.2


def test_plot_arm_nll_needs_an_nll():
    with pytest.raises(ValueError, match="no arm"):
        vze.plot_arm_nll({"summary": {"a": {"curve": []}}})


def test_plot_skip_curves_two_stacked_panels():
    fig = vze.plot_skip_curves(_results(), title="t")
    ax_fid, ax_rec = fig.axes
    assert ax_fid.get_position().y0 > ax_rec.get_position().y0  # stacked vertically
    assert [t.get_text() for t in ax_fid.get_legend().get_texts()] == ["linear", "cosine"]
    ys = ax_fid.lines[0].get_ydata()
    assert list(ys) == pytest.approx([11.0, 12.0])
    assert _width_px(fig) <= vze.MAX_WIDTH * fig.dpi


def test_plot_scaling_fit_lines_match_the_fits():
    res = _scaling()
    fig = vze.plot_scaling(res)
    ax_fid, ax_nll = fig.axes
    assert ax_fid.get_xscale() == "log" and ax_fid.get_yscale() == "log"
    fit_line = next(line for line in ax_fid.lines if line.get_linestyle() == "--")
    x0, x1 = fit_line.get_xdata()
    assert x0 == pytest.approx(2e9) and x1 == pytest.approx(1.6e10)
    assert fit_line.get_ydata()[0] == pytest.approx(10 ** (3.0 - 0.3 * math.log10(2e9)))
    legend = [t.get_text() for t in ax_fid.get_legend().get_texts()]
    assert any("slope -0.300" in t and "0.90" in t for t in legend)
    assert any("w32 (0.80 M params)" == t for t in legend)
    assert ax_nll.get_yscale() == "log"
    # plain tick labels, not 7.26x10^1
    assert vze.plot_scaling(res).axes[0].yaxis.get_major_formatter()(72.64, 0) == "72.64"


def test_plot_quality_cases_three_panels_in_order():
    cases = {
        "real": {"fid": 1.0, "precision": 0.9, "recall": 0.9},
        "few classes": {"fid": 40.0, "precision": 0.9, "recall": 0.5},
    }
    fig = vze.plot_quality_cases(cases)
    assert len(fig.axes) == 3
    assert [p.get_height() for p in fig.axes[2].patches] == pytest.approx([0.9, 0.5])
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["real", "few classes"]
    with pytest.raises(ValueError):
        vze.plot_quality_cases({})


def test_plot_image_sets_and_scores_accept_uint8():
    imgs = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    fig = vze.plot_image_sets({"a": imgs, "b": imgs[:10]}, nrow=10)
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    shown = fig.axes[0].images[0].get_array()
    assert shown.min() >= 0 and shown.max() <= 1
    fig = vze.plot_images_and_scores(imgs.numpy(), {"precision": 0.5, "recall": 0.25}, "title")
    ax_img, ax_bar = fig.axes
    assert ax_img.get_title() == "title"
    assert [p.get_width() for p in ax_bar.patches] == pytest.approx([0.5, 0.25])


def test_figures_fit_a_narrow_screen():
    with pytest.raises(ValueError, match="at most"):
        vze.plot_image_sets({"a": torch.zeros(4, 1, 8, 8)}, width=8.0)
