"""Tests for iddpm.viz_sampling: the figures of chapters 7 and 8 from synthetic results (no display)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iddpm import viz_sampling as vs

pytest.importorskip("matplotlib")


def _stat(*values: float) -> dict:
    mean = sum(values) / len(values)
    return {"mean": mean, "se": 0.1, "n": len(values), "values": list(values)}


def _results() -> dict:
    gns = [{"step": s, "b_simple": _stat(10.0 * s, 12.0 * s)} for s in (400, 800)]
    quality = [
        {"steps": k, "fid": _stat(50 / k, 60 / k), "precision": _stat(0.8), "recall": _stat(0.5)}
        for k in (10, 100)
    ]
    return {
        "claim": "c",
        "paper": "noisy <gradients> & more",
        "scale": "smoke",
        "summary": {
            "hybrid": {"nll": _stat(3.0, 3.2), "gns": gns, "quality": {"hybrid": quality}},
            "vlb": {"nll": _stat(3.5, 3.1), "gns": gns},
        },
        "verdict": {
            "verdict": "partly",
            "held": 1,
            "of": 2,
            "checks": [
                {"check": "a < b", "holds": True, "difference": 1.5, "se": 0.2, "z": 7.5},
                {"check": "c < d", "holds": False, "difference": -0.1, "se": 0.0, "z": None},
            ],
        },
    }


def _axes_texts(fig) -> list[str]:
    return [ax.get_xlabel() for ax in fig.axes] + [ax.get_ylabel() for ax in fig.axes]


def test_plot_loss_scale_accepts_matrix_and_vector() -> None:
    terms = torch.rand(5, 20, dtype=torch.float64) + 1e-3
    fig = vs.plot_loss_scale(terms, title="x")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() == "x"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), terms.mean(0).numpy())
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), np.arange(1, 21))  # paper's t
    vs.plot_loss_scale(terms.mean(0).numpy())
    with pytest.raises(ValueError, match="terms must be"):
        vs.plot_loss_scale(torch.zeros(2, 3, 4))


def test_plot_sampler_weights_normalises_and_marks_uniform() -> None:
    w = torch.tensor([1.0, 3.0, 0.0, 4.0], dtype=torch.float64)
    fig = vs.plot_sampler_weights(w, step=7, warmed_up=False)
    ax = fig.axes[0]
    (stairs,) = ax.patches
    np.testing.assert_allclose(stairs.get_data().values, (w / w.sum()).numpy())
    assert ax.lines[0].get_ydata()[0] == pytest.approx(0.25)
    title = fig.get_suptitle()
    assert "7" in title and "warm-up" in title
    assert vs.plot_sampler_weights(w, title="target").get_suptitle() == "target"
    for bad in (torch.tensor([-1.0, 2.0]), torch.zeros(3), torch.ones(2, 2)):
        with pytest.raises(ValueError, match="weights must be"):
            vs.plot_sampler_weights(bad)


def test_sampler_weight_frames_are_pngs_one_per_snapshot() -> None:
    snaps = [torch.ones(10), torch.arange(1.0, 11.0)]
    frames = vs.sampler_weight_frames(snaps, [0, 100], warmed_up=[False, True], dpi=100)
    assert len(frames) == 2 and all(f.startswith(b"\x89PNG") for f in frames)
    assert frames[0] != frames[1]
    with pytest.raises(ValueError, match="snapshots but"):
        vs.sampler_weight_frames(snaps, [0])
    with pytest.raises(ValueError, match="warm-up flags"):
        vs.sampler_weight_frames(snaps, [0, 1], warmed_up=[True])
    with pytest.raises(ValueError, match="no snapshots"):
        vs.sampler_weight_frames([], [])


def test_plot_learning_curves() -> None:
    fig = vs.plot_learning_curves({"a": ([0, 10], [2.0, 1.0]), "b": ([0, 10], [3.0, 1.5])}, log=True)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="empty"):
        vs.plot_learning_curves({})
    with pytest.raises(ValueError, match="2 steps but 1 values"):
        vs.plot_learning_curves({"a": ([0, 1], [1.0])})


def test_plot_gns_and_nll_from_results() -> None:
    res = _results()
    fig = vs.plot_gns(res, labels={"hybrid": "L_hybrid"})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["L_hybrid", "vlb"]
    inf_row = {
        "step": 1200,
        "b_simple": _stat(float("inf"), 5.0),
        "log10_b": {
            "mean": float("inf"),
            "se": float("nan"),
            "n": 2,
            "values": [float("inf"), math.log10(5.0)],
        },
    }
    res["summary"]["vlb"]["gns"] = [*res["summary"]["vlb"]["gns"], inf_row]
    # an unbounded seed: no mean at that step, a triangle at the top, the other seed a dot
    fig = vs.plot_gns(res)
    ax = fig.axes[0]
    vlb_line = ax.containers[1].lines[0]  # the ErrorbarContainer of the second arm
    assert list(vlb_line.get_xdata()) == [400, 800]
    assert any(line.get_marker() == "^" and list(line.get_xdata()) == [1200] for line in ax.lines)
    assert any(np.allclose(line.get_ydata(), [5.0]) and len(line.get_ydata()) == 1 for line in ax.lines)
    assert any("unbounded" in t.get_text() for t in ax.get_legend().get_texts())
    # without log10_b in the file the geometric mean over seeds is computed from b_simple
    hyb = {"summary": {"hybrid": res["summary"]["hybrid"]}}
    mids = vs.plot_gns(hyb).axes[0].containers[0].lines[0].get_ydata()
    np.testing.assert_allclose(np.asarray(mids, float), [math.sqrt(4000 * 4800), math.sqrt(8000 * 9600)])
    fig = vs.plot_nll(res["summary"])  # the summary alone works too
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["hybrid", "vlb"]
    with pytest.raises(ValueError, match="gns"):
        vs.plot_gns({"summary": {"a": {"nll": _stat(1.0)}}})
    with pytest.raises(ValueError, match="nll"):
        vs.plot_nll({"summary": {"a": {}}})


def test_plot_quality_vs_steps_three_stacked_panels() -> None:
    fig = vs.plot_quality_vs_steps(_results(), labels={"hybrid": "learned sigma"})
    assert len(fig.axes) == 3
    pos = [ax.get_position() for ax in fig.axes]
    assert pos[0].y0 > pos[1].y0 > pos[2].y0  # stacked vertically (readable on a narrow screen)
    assert fig.axes[0].get_yscale() == "log" and fig.axes[2].get_xlabel() == "sampling steps K"
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "learned sigma"
    with pytest.raises(ValueError, match="quality"):
        vs.plot_quality_vs_steps({"summary": {"a": {}}})


def test_verdict_html_lists_every_check_escaped() -> None:
    out = vs.verdict_html(_results()).data
    assert "partly" in out and "1 of 2 checks" in out and "smoke" in out
    assert "noisy &lt;gradients&gt; &amp; more" in out
    assert out.count("<tr>") == 3  # header + 2 checks
    assert "<td>yes</td>" in out and "<td>no</td>" in out and "<td>-</td>" in out
