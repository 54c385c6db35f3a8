"""Tests for iddpm.viz_training: the figures of the training chapters (fast, no display needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iddpm import viz_training as vt
from iddpm.ema import ema_init_weight

pytest.importorskip("matplotlib")


def _stat(m: float, se: float = 0.1, values: list[float] | None = None) -> dict:
    return {"mean": m, "se": se, "n": len(values or [m]), "values": values or [m]}


SUMMARY = {
    "simple": {
        "nll": _stat(6.0, 0.2, [5.8, 6.2]),
        "quality": {
            v: [
                {"steps": k, "fid": _stat(50 / k), "precision": _stat(0.8), "recall": _stat(0.5)}
                for k in (10, 2)
            ]
            for v in ("simple-beta", "simple-beta-tilde", "ddim")
        },
    },
    "hybrid": {
        "nll": _stat(5.0, 0.1, [4.9, 5.1]),
        "quality": {
            "hybrid": [
                {"steps": k, "fid": _stat(40 / k), "precision": _stat(0.9), "recall": _stat(0.6)}
                for k in (2, 10)
            ]
        },
    },
}


def _lines(fig) -> list:
    return [line for ax in fig.axes for line in ax.get_lines()]


def test_running_mean() -> None:
    np.testing.assert_allclose(vt.running_mean([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(vt.running_mean(torch.tensor([2.0, 4.0]), 10), [2, 3])
    with pytest.raises(ValueError, match="window"):
        vt.running_mean([1.0], 0)


def test_ema_share_plots_ema_init_weight() -> None:
    fig = vt.plot_ema_init_share(rates=(0.999,), max_steps=5000, mark_steps=(1200,))
    plain, warm = [ln for ln in _lines(fig) if len(ln.get_xdata()) > 2]
    steps = plain.get_xdata()
    assert steps[0] == 1 and steps[-1] == 5000
    np.testing.assert_allclose(plain.get_ydata(), [0.999 ** int(n) for n in steps])
    np.testing.assert_allclose(warm.get_ydata(), [ema_init_weight(0.999, int(n), True) for n in steps])
    assert warm.get_ydata()[-1] < plain.get_ydata()[-1]  # the warm-up forgets the initialisation faster
    assert fig.get_size_inches()[0] <= 5.5


def test_loss_curve_one_smoothed_line_per_run() -> None:
    fig = vt.plot_loss_curve({"a": np.linspace(1, 0.1, 50), "b": torch.ones(30)}, window=5)
    lines = _lines(fig)
    assert len(lines) == 4 and len(lines[0].get_xdata()) == 50
    np.testing.assert_allclose(lines[1].get_ydata(), vt.running_mean(np.linspace(1, 0.1, 50), 5))
    with pytest.raises(ValueError):
        vt.plot_loss_curve({})


def test_unet_stages() -> None:
    fig = vt.plot_unet_stages(["in", "down", "mid"], [(2, 32, 8, 8), (2, 32, 4, 4), (2, 64, 4, 4)])
    (ax,) = fig.axes
    assert [p.get_width() for p in ax.patches] == [32, 32, 64]
    assert [t.get_text().strip() for t in ax.texts] == ["8x8", "4x4", "4x4"]
    with pytest.raises(ValueError):
        vt.plot_unet_stages(["a"], [(1, 2, 3)])


def test_interpolation_and_terms_are_stacked() -> None:
    T = 10
    t = np.arange(1, T + 1) / T
    fig = vt.plot_interpolation_over_t(t, np.full(T, 0.3), np.zeros(T), np.ones(T), t, t / 2, t * 0.7)
    assert len(fig.axes) == 2
    w, h = fig.get_size_inches()
    assert h > w and w <= 5.5  # one column: panels stacked
    fig = vt.plot_terms_per_t({"x": np.ones(T), "y": torch.full((T,), 2.0)})
    assert len(fig.axes) == 2
    cum = fig.axes[1].get_lines()[1].get_ydata()
    np.testing.assert_allclose(cum, 2.0 * np.arange(1, T + 1))


def test_arm_stats() -> None:
    fig = vt.plot_arm_stats({a: SUMMARY[a]["nll"] for a in SUMMARY}, "NLL")
    (ax,) = fig.axes
    assert [p.get_width() for p in ax.patches] == [6.0, 5.0]


def test_quality_vs_steps_sorted_by_k_and_stacked() -> None:
    fig = vt.plot_quality_vs_steps(SUMMARY, variants=["hybrid", "ddim"], full_steps=10)
    assert len(fig.axes) == 3
    fid_lines = [c.lines[0] for c in fig.axes[0].containers]  # the data line of each errorbar
    assert list(fid_lines[0].get_xdata()) == [2, 10]
    assert list(fid_lines[1].get_ydata()) == [25.0, 5.0]  # ddim rows were given K = 10 first: sorted
    assert fig.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="not in the results"):
        vt.plot_quality_vs_steps(SUMMARY, variants=["nope"])
    with pytest.raises(ValueError, match="no sample-quality"):
        vt.plot_quality_vs_steps({"a": {}})


def test_verdict_lines() -> None:
    res = {
        "verdict": {
            "verdict": "partly",
            "held": 1,
            "of": 2,
            "checks": [
                {"check": "A < B", "holds": True, "difference": 1.5, "se": 0.5, "z": 3.0},
                {"check": "C < D", "holds": False, "difference": -2.0, "se": 0.0, "z": None},
            ],
        }
    }
    lines = vt.verdict_lines(res)
    assert lines[0] == "verdict: partly (1 of 2 checks hold)"
    assert lines[1].split() == ["holds", "A", "<", "B"] and "z = 3.00" in lines[2] and "± 0.5" in lines[2]
    assert lines[3].split()[0] == "fails" and "se" not in lines[4] and "-2" in lines[4]
    assert len(lines) == 5 and max(map(len, lines)) < 80
    assert "no verdict" in vt.verdict_lines({"experiment": "x"})[0]


def test_grey_frames_match_image_grid() -> None:
    import io

    from PIL import Image

    from iddpm import viz

    x = torch.linspace(-1, 1, 2 * 16).reshape(2, 1, 4, 4)
    (png,) = vt.grey_frames([x], nrow=2)
    img = Image.open(io.BytesIO(png))
    assert img.mode == "L" and img.size == (9, 4)
    np.testing.assert_allclose(np.asarray(img) / 255, viz.image_grid(x, nrow=2), atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError, match="1-channel"):
        vt.grey_frames([torch.zeros(1, 3, 2, 2)])
