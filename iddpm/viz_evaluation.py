"""Figures and text of chapter 9 (Evaluating), drawn from a ``results.json`` or from live measurements.

Like :mod:`iddpm.viz`, nothing in the core package imports this module and matplotlib is imported lazily.
Every figure is a ``matplotlib.figure.Figure`` built without pyplot (it shows once when it is a cell's last
value). Multi-panel figures stack their panels vertically and are at most 5.5 inches wide, so they stay
readable on a 390 px wide phone screen.

* :func:`verdict_lines`: the verdict of a claim and each of its checks, as plain text lines.
* :func:`plot_arm_nll`: held-out NLL per arm (mean over seeds, one standard error, each seed as a dot).
* :func:`plot_skip_curves`: digit-FID against the share of the reverse process skipped (claim a).
* :func:`plot_scaling`: digit-FID and NLL against training FLOPs with the fitted power law (claim e).
* :func:`plot_quality_cases`: digit-FID, precision and recall of constructed sample sets (stacked bars).
* :func:`plot_image_sets`: named sets of digits, one titled grid under the other.
* :func:`plot_images_and_scores`: an image grid above bars of precision and recall (scrubber frames).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .report import errorbar

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

__all__ = [
    "plot_arm_nll",
    "plot_image_sets",
    "plot_images_and_scores",
    "plot_quality_cases",
    "plot_scaling",
    "plot_skip_curves",
    "verdict_lines",
]

MAX_WIDTH = 5.5  # inches: about 390 CSS px at the book's image scaling keeps 9 pt text legible


def _figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    if figsize[0] > MAX_WIDTH:
        raise ValueError(f"figures are at most {MAX_WIDTH} inches wide (narrow screens), got {figsize[0]}")
    return Figure(figsize=figsize, layout="constrained")


def verdict_lines(results: Mapping[str, Any]) -> list[str]:
    """The claim, its verdict and every check of a ``results.json``, one plain-text line each.

    A check's line reads ``[holds] what: difference d (se s, z = d/s)``; ``holds`` means the difference is
    larger than twice its standard error (:mod:`iddpm.verdicts`).
    """
    v = results["verdict"]
    lines = [
        f"claim {results['claim']} ({results['title']}), {results['scale']} scale: "
        f"{v['verdict']} ({v['held']} of {v['of']} checks hold)"
    ]
    for c in v["checks"]:
        mark = "holds" if c["holds"] else "fails"
        extra = ""
        if c.get("se"):
            z = f", z = {c['z']:.2f}" if c.get("z") is not None else ""
            extra = f" (se {c['se']:.3g}{z})"
        lines.append(f"  [{mark}] {c['check']}: difference {c['difference']:.3g}{extra}")
    return lines


def _arm_label(arm: str, stat: Mapping[str, Any]) -> str:
    return f"{arm}\n(n={stat['n']})"


def plot_arm_nll(
    results: Mapping[str, Any],
    arms: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Figure:
    """Held-out NLL (bits/dim) per arm: the mean over seeds with one standard error, each seed a dot.

    Args:
        results: a ``results.json`` with ``summary[arm]["nll"]`` (mean, se, n, values).
        arms: which arms, in order (default: every arm with an NLL, in the file's order).
        labels: display names of the arms (default: the arm names).
        title: the axes title.
    """
    s = results["summary"]
    arms = list(arms) if arms is not None else [a for a in s if "nll" in s[a]]
    if not arms:
        raise ValueError("no arm with a held-out NLL in these results")
    labels = dict(labels or {})
    fig = _figure((4.6, 3.0))
    ax = fig.add_subplot()
    stats = [s[a]["nll"] for a in arms]
    xs = np.arange(len(arms))
    ax.bar(xs, [st["mean"] for st in stats], yerr=[st["se"] for st in stats], capsize=4, color="#4c72b0")
    for x, st in zip(xs, stats, strict=True):
        ax.plot([x] * len(st["values"]), st["values"], "k.", ms=6, zorder=3)
    ax.set_xticks(xs, [_arm_label(labels.get(a, a), st) for a, st in zip(arms, stats, strict=True)])
    lo = min(min(st["values"]) - st["se"] for st in stats)
    hi = max(max(st["values"]) + st["se"] for st in stats)
    pad = 0.25 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("held-out NLL (bits/dim)", fontsize=10)
    ax.tick_params(labelsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_skip_curves(results: Mapping[str, Any], title: str | None = None) -> Figure:
    """digit-FID (and recall, below it) against the percentage of the noisiest reverse steps skipped.

    Args:
        results: a claim-a ``results.json`` with ``summary[arm]["skip"]`` rows ``{skip, fid, recall, ...}``.
    """
    s = results["summary"]
    arms = [a for a in s if "skip" in s[a]]
    if not arms:
        raise ValueError("no arm with a 'skip' curve in these results")
    fig = _figure((4.6, 5.2))
    ax_fid, ax_rec = fig.subplots(2, 1, sharex=True)
    for a in arms:
        rows = s[a]["skip"]
        xs = [100 * r["skip"] for r in rows]
        for ax, key in ((ax_fid, "fid"), (ax_rec, "recall")):
            errorbar(ax, xs, [r[key] for r in rows], a)
    ax_fid.set_ylabel("digit-FID (lower is better)", fontsize=10)
    ax_rec.set_ylabel("recall", fontsize=10)
    ax_rec.set_xlabel("% of the reverse process skipped (noisiest steps first)", fontsize=10)
    ax_fid.legend(fontsize=9)
    for ax in (ax_fid, ax_rec):
        ax.tick_params(labelsize=9)
    if title:
        ax_fid.set_title(title, fontsize=10)
    return fig


def plot_scaling(results: Mapping[str, Any]) -> Figure:
    """Claim e: digit-FID (top) and held-out NLL (bottom) against training FLOPs, log-log, one line per width.

    The dashed lines are the power laws fitted in ``results["fits"]``
    (``log10 y = intercept + slope log10 x``, :func:`iddpm.verdicts.fit_power_law`), labelled with their slope
    and r^2.
    """
    s = results["summary"]
    arms = [a for a in s if "curve" in s[a]]
    if not arms:
        raise ValueError("no arm with a training curve in these results")
    fits = results.get("fits", {})
    fig = _figure((4.8, 6.2))
    ax_fid, ax_nll = fig.subplots(2, 1, sharex=True)
    all_x: list[float] = []
    for a in arms:
        rows = [r for r in s[a]["curve"] if r["train_flops"] > 0]
        xs = [r["train_flops"] for r in rows]
        all_x += xs
        params = s[a].get("params")
        label = f"{a} ({params / 1e6:.2f} M params)" if params else a
        for ax, key in ((ax_fid, "fid"), (ax_nll, "bpd")):
            errorbar(ax, xs, [r[key] for r in rows], label)
    if all_x:
        ends = [min(all_x), max(all_x)]
        for ax, key in ((ax_fid, "fid_vs_flops"), (ax_nll, "bpd_vs_flops")):
            fit = fits.get(key)
            if fit:
                ys = [10 ** (fit["intercept"] + fit["slope"] * math.log10(x)) for x in ends]
                ax.plot(
                    ends, ys, "k--", lw=1, label=f"power law: slope {fit['slope']:.3f}, r² {fit['r2']:.2f}"
                )
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:.4g}")  # 72.6, not 7.26x10^1, on a narrow log axis
    for ax in (ax_fid, ax_nll):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(labelsize=9)
        ax.tick_params(which="minor", labelsize=8)
        ax.legend(fontsize=8)
    ax_fid.set_ylabel("digit-FID", fontsize=10)
    ax_nll.set_ylabel("held-out NLL (bits/dim)", fontsize=10)
    ax_nll.set_xlabel("training compute (FLOPs)", fontsize=10)
    return fig


def plot_quality_cases(cases: Mapping[str, Mapping[str, float]]) -> Figure:
    """Three stacked bar charts (digit-FID, precision, recall) of named sample sets.

    Args:
        cases: ``{name: {"fid": ..., "precision": ..., "recall": ...}}``, e.g. real held-out digits, only
            some classes, blurred digits.
    """
    names = list(cases)
    if not names:
        raise ValueError("no cases to plot")
    fig = _figure((4.6, 6.4))
    axes = fig.subplots(3, 1, sharex=True)
    xs = np.arange(len(names))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    for ax, key, label in zip(
        axes,
        ("fid", "precision", "recall"),
        ("digit-FID (lower is better)", "precision", "recall"),
        strict=True,
    ):
        vals = [cases[n][key] for n in names]
        ax.bar(xs, vals, color=[colours[i % len(colours)] for i in range(len(names))])
        for x, v in zip(xs, vals, strict=True):
            ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=9)
        ax.set_ylabel(label, fontsize=10)
        ax.tick_params(labelsize=9)
        if key != "fid":
            ax.set_ylim(0, 1.15)
        else:
            ax.set_ylim(0, 1.15 * max(max(vals), 1e-9))
    axes[-1].set_xticks(xs, names, rotation=20, ha="right")
    return fig


def _to_model_range(images: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """uint8 images -> floats in [-1, 1]; float images are returned as they are."""
    import torch

    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images


def plot_image_sets(sets: Mapping[str, Tensor | np.ndarray], nrow: int = 10, width: float = 4.2) -> Figure:
    """Named sets of images, each a titled grid, stacked vertically (readable on a narrow screen).

    Args:
        sets: ``{title: (B, C, H, W) images}``, uint8 or floats in [-1, 1].
        nrow: images per row of each grid.
        width: figure width in inches.
    """
    from .viz import image_grid

    if not sets:
        raise ValueError("no image sets to plot")
    grids = {name: image_grid(_to_model_range(x), nrow=nrow) for name, x in sets.items()}
    heights = [g.shape[0] / g.shape[1] * width for g in grids.values()]
    fig = _figure((width, sum(heights) + 0.35 * len(grids)))
    axes = fig.subplots(len(grids), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (name, grid) in zip(axes, grids.items(), strict=True):
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(name, fontsize=10)
    return fig


def plot_images_and_scores(
    images: Tensor | np.ndarray,
    scores: Mapping[str, float],
    title: str,
    nrow: int = 10,
) -> Figure:
    """One scrubber frame: a grid of digits on top, a bar per score (each in [0, 1]) below.

    Args:
        images: ``(B, 1, H, W)`` uint8 digits or floats in [-1, 1].
        scores: e.g. ``{"precision": p, "recall": r}``; values in [0, 1].
        title: plain text above the grid.
        nrow: images per row of the grid.
    """
    from .viz import image_grid

    grid = image_grid(_to_model_range(images), nrow=nrow)
    img_h = 3.6 * grid.shape[0] / grid.shape[1]  # inches the grid needs at about 3.6 inches wide
    bar_h = 0.35 * len(scores) + 0.4
    fig = _figure((4.0, img_h + bar_h + 0.4))
    ax_img, ax_bar = fig.subplots(2, 1, height_ratios=[img_h, bar_h])
    ax_img.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_img.set_axis_off()
    ax_img.set_title(title, fontsize=10)
    names = list(scores)
    vals = [scores[n] for n in names]
    ax_bar.barh(names, vals, color=["#4c72b0", "#dd8452", "#55a868"][: len(names)])
    for i, v in enumerate(vals):
        ax_bar.text(min(v, 1.0) + 0.02, i, f"{v:.2f}", va="center", fontsize=9)
    ax_bar.set_xlim(0, 1.2)
    ax_bar.invert_yaxis()
    ax_bar.tick_params(labelsize=9)
    return fig
