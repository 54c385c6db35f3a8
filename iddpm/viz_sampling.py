"""Pictures for the book's chapters on importance sampling and fast sampling (chapters 7 and 8).

Like :mod:`iddpm.viz`, nothing in the core package imports this module and matplotlib is imported lazily.
Every figure is a ``matplotlib.figure.Figure`` built without pyplot (shown once when it is a cell's last
value), with multi-panel figures stacked vertically so they stay readable on a 390 px wide phone screen.

* :func:`plot_loss_scale` -- the per-timestep terms ``L_t`` of the bound, log scale (why ``T * L_t`` under
  uniform ``t`` is a noisy estimate).
* :func:`plot_sampler_weights`, :func:`sampler_weight_frames` -- the importance sampler's ``p_t`` over ``t``,
  one frame per training-step snapshot (for :func:`iddpm.viz.scrubber`).
* :func:`plot_learning_curves` -- held-out loss against training step, one line per arm.
* :func:`plot_gns` -- the gradient noise scale over training per arm, from a results file's ``summary``.
* :func:`plot_nll` -- held-out NLL per arm (mean, standard error and every seed), from ``summary``.
* :func:`plot_quality_vs_steps` -- digit-FID, precision and recall against the number of sampling steps K.
* :func:`verdict_html` -- a results file's verdict and its checks as a small HTML table.

Results-file arguments are the ``summary`` (or the whole results dict) that
:func:`iddpm.experiment.load_results` returns: statistics are ``{"mean", "se", "n", "values"}`` dicts.

Chapter: book/07_importance_sampling, book/08_respacing
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .report import errorbar
from .viz import fig_to_png

if TYPE_CHECKING:
    from IPython.display import HTML
    from matplotlib.figure import Figure

__all__ = [
    "plot_gns",
    "plot_learning_curves",
    "plot_loss_scale",
    "plot_nll",
    "plot_quality_vs_steps",
    "plot_sampler_weights",
    "sampler_weight_frames",
    "verdict_html",
]

FONT = 10  # points; scrubber frames at 100 dpi keep text >= 9 pt legible


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _np(x: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _style(ax: Any) -> None:
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=FONT - 1)


# ----------------------------------------------------------------------------------------------------------
# Chapter 7: importance sampling
# ----------------------------------------------------------------------------------------------------------


def plot_loss_scale(
    terms: Tensor | np.ndarray,
    title: str | None = None,
    size: tuple[float, float] = (5.2, 3.4),
) -> Figure:
    """The per-timestep terms ``L_t`` of the bound on a log axis: the mean over images and its 10-90% band.

    Args:
        terms: ``(N, T)`` bits/dim, column ``k`` the term at 0-based ``t = k`` (``BpdResult.terms``), or a
            ``(T,)`` mean.
        title: plain-text title.
        size: inches.
    """
    a = _np(terms)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"terms must be (N, T) or (T,), got shape {tuple(a.shape)}")
    t = np.arange(1, a.shape[1] + 1)  # the paper's t
    fig = _figure(*size)
    ax = fig.add_subplot()
    mean = a.mean(0)
    ax.plot(t, mean, "o-", ms=3, label="mean over images")
    if a.shape[0] > 1:
        lo, hi = np.percentile(a, [10, 90], axis=0)
        ax.fill_between(t, np.maximum(lo, 1e-12), np.maximum(hi, 1e-12), alpha=0.25, label="10-90% of images")
    ax.axhline(mean.mean(), color="k", lw=0.8, ls="--", label="mean over t")
    ax.set_yscale("log")
    ax.set_xlabel("diffusion step t", fontsize=FONT)
    ax.set_ylabel("L_t (bits/dim)", fontsize=FONT)
    if title:
        ax.set_title(title, fontsize=FONT + 1)
    ax.legend(fontsize=FONT - 1)
    _style(ax)
    return fig


def plot_sampler_weights(
    weights: Tensor | np.ndarray,
    step: int | None = None,
    ymax: float | None = None,
    warmed_up: bool = True,
    size: tuple[float, float] = (5.0, 3.0),
    title: str | None = None,
) -> Figure:
    """One snapshot of a timestep sampler: ``p_t`` (the normalised ``weights``) against ``t``, and uniform.

    Args:
        weights: ``(T,)`` non-negative sampler weights (``sampler.weights()``; need not sum to 1).
        step: the training step of the snapshot, for the title.
        ymax: fixed upper y limit, so frames of a scrubber share one axis.
        warmed_up: False draws a note that the sampler is still uniform (warm-up).
        size: inches.
        title: plain-text title instead of the training step.
    """
    w = _np(weights)
    if w.ndim != 1 or w.size < 1 or (w < 0).any() or not w.sum() > 0:
        raise ValueError(
            "weights must be a non-empty (T,) vector of non-negative numbers with a positive sum"
        )
    p = w / w.sum()
    T = p.size
    fig = _figure(*size)
    ax = fig.add_subplot()
    # one filled step artist (not T bars): a scrubber draws this figure once per frame
    ax.stairs(p, np.arange(T + 1) + 0.5, fill=True, color="C0", label="p_t (importance sampler)")
    ax.axhline(1.0 / T, color="C3", lw=1.2, ls="--", label="uniform, 1/T")
    floor = min(p[p > 0].min(), 1.0 / T) / 2
    ax.set_ylim(floor, ymax if ymax is not None else max(p.max(), 1.0 / T) * 2)
    ax.set_yscale("log")
    ax.set_xlim(0.5, T + 0.5)
    ax.set_xlabel("diffusion step t", fontsize=FONT)
    ax.set_ylabel("probability of drawing t", fontsize=FONT)
    head = f"training step {step}" if step is not None else "sampler weights"
    if not warmed_up:
        head += " (warm-up: still uniform)"
    if title is not None:
        head = title
    fig.suptitle(head, fontsize=FONT + 1)
    # above the axes, where no bar can hide it (the mass may pile up at either end of the chain)
    ax.legend(fontsize=FONT - 1, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    _style(ax)
    return fig


def sampler_weight_frames(
    snapshots: Sequence[Tensor | np.ndarray],
    steps: Sequence[int],
    warmed_up: Sequence[bool] | None = None,
    dpi: int = 100,
    size: tuple[float, float] = (5.0, 3.0),
) -> list[bytes]:
    """PNG frames of :func:`plot_sampler_weights`, one per snapshot, all on the same y axis.

    Args:
        snapshots: ``(T,)`` weights per snapshot.
        steps: the training step of each snapshot.
        warmed_up: per snapshot, whether the sampler had left its warm-up (default: all True).
        dpi: >= 100 keeps the 9-10 pt text legible in the static book.
    """
    if len(snapshots) != len(steps):
        raise ValueError(f"{len(snapshots)} snapshots but {len(steps)} steps")
    if not snapshots:
        raise ValueError("no snapshots")
    if warmed_up is not None and len(warmed_up) != len(steps):
        raise ValueError(f"{len(warmed_up)} warm-up flags for {len(steps)} snapshots")
    ps = [_np(w) / _np(w).sum() for w in snapshots]
    ymax = 2 * max(max(p.max() for p in ps), 1.0 / ps[0].size)
    return [
        fig_to_png(
            plot_sampler_weights(
                w, step=s, ymax=ymax, warmed_up=True if warmed_up is None else bool(warmed_up[i]), size=size
            ),
            dpi=dpi,
        )
        for i, (w, s) in enumerate(zip(snapshots, steps, strict=True))
    ]


def plot_learning_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str = "held-out loss",
    log: bool = False,
    title: str | None = None,
    size: tuple[float, float] = (5.2, 3.4),
) -> Figure:
    """Learning curves: ``{label: (steps, values)}``, one line per arm."""
    if not curves:
        raise ValueError("curves is empty")
    fig = _figure(*size)
    ax = fig.add_subplot()
    for label, (xs, ys) in curves.items():
        if len(xs) != len(ys):
            raise ValueError(f"curve {label!r}: {len(xs)} steps but {len(ys)} values")
        ax.plot(list(xs), list(ys), "o-", ms=3, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("training step", fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    if title:
        ax.set_title(title, fontsize=FONT + 1)
    ax.legend(fontsize=FONT - 1)
    _style(ax)
    return fig


def _summary(results: Mapping[str, Any]) -> Mapping[str, Any]:
    return results["summary"] if "summary" in results else results


def plot_gns(
    results: Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
    size: tuple[float, float] = (5.2, 4.2),
) -> Figure:
    """The simple gradient noise scale ``B`` against training step, per arm, on a log axis.

    Per checkpoint: the geometric mean over seeds with its standard error (from the mean and se of
    ``log10 B``) and a faint dot per seed. A seed whose estimate of ``|G|^2`` came out <= 0 has an unbounded
    ``B`` (``inf``): it is drawn as a triangle at the top edge, and that checkpoint gets no mean.

    Args:
        results: a results dict (or its ``summary``) whose arms have ``gns``: a list of ``{"step",
            "b_simple": stat}`` rows, each optionally with ``"log10_b": stat`` (else taken from ``b_simple``).
        labels: display names per arm (default: the arm names).
    """
    s = _summary(results)
    arms = [a for a in s if "gns" in s[a]]
    if not arms:
        raise ValueError("no arm of these results has a 'gns' entry")
    fig = _figure(*size)
    ax = fig.add_subplot()
    unbounded = False
    for j, a in enumerate(arms):
        color = f"C{j}"
        xs, mids, lo, hi = [], [], [], []
        for r in s[a]["gns"]:
            logs = r.get("log10_b") or {
                "values": [math.log10(v) if v > 0 else math.inf for v in r["b_simple"]["values"]],
                "mean": math.nan,
                "se": math.nan,
            }
            vals = [float(v) for v in logs["values"]]
            finite = [v for v in vals if math.isfinite(v)]
            ax.plot([r["step"]] * len(finite), [10**v for v in finite], ".", color=color, alpha=0.45, ms=6)
            if len(finite) < len(vals):
                unbounded = True
                ax.plot(
                    [r["step"]],
                    [0.96],
                    "^",
                    color=color,
                    ms=8,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                )
            mean, se = float(logs["mean"]), float(logs["se"])
            if not math.isfinite(mean) and len(finite) == len(vals):
                mean = sum(vals) / len(vals)  # computed from the values (no log10_b entry in the file)
                se = 0.0
            if math.isfinite(mean):
                se = se if math.isfinite(se) else 0.0
                xs.append(r["step"])
                mids.append(10**mean)
                lo.append(10**mean - 10 ** (mean - se))
                hi.append(10 ** (mean + se) - 10**mean)
        ax.errorbar(
            xs, mids, yerr=[lo, hi], color=color, marker="o", ms=5, capsize=3, label=(labels or {}).get(a, a)
        )
    if unbounded:
        ax.plot([], [], "^", color="0.4", ms=8, label="a seed's B unbounded (|G|^2 <= 0)")
    ax.set_yscale("log")
    ax.set_xlabel("training step", fontsize=FONT)
    ax.set_ylabel("gradient noise scale B", fontsize=FONT)
    # below the axes: the seeds spread over orders of magnitude and a legend inside would hide some
    ax.legend(fontsize=FONT - 1, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    _style(ax)
    return fig


def plot_nll(
    results: Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
    size: tuple[float, float] = (5.2, 3.0),
) -> Figure:
    """Held-out NLL per arm: a horizontal bar at the mean with its standard error, and a dot per seed."""
    s = _summary(results)
    arms = [a for a in s if "nll" in s[a]]
    if not arms:
        raise ValueError("no arm of these results has an 'nll' entry")
    fig = _figure(*size)
    ax = fig.add_subplot()
    for i, a in enumerate(arms):
        st = s[a]["nll"]
        ax.errorbar([st["mean"]], [i], xerr=[st["se"]], fmt="s", color="C0", capsize=4, ms=7)
        ax.plot(st["values"], [i] * len(st["values"]), "k.", ms=6)
    ax.set_yticks(range(len(arms)), [(labels or {}).get(a, a) for a in arms], fontsize=FONT)
    ax.set_ylim(-0.6, len(arms) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("held-out NLL (bits/dim), lower is better", fontsize=FONT)
    _style(ax)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Chapter 8: respacing
# ----------------------------------------------------------------------------------------------------------


def plot_quality_vs_steps(
    results: Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
    size: tuple[float, float] = (5.2, 8.0),
) -> Figure:
    """digit-FID, precision and recall against the number of sampling steps K: three panels, stacked.

    Args:
        results: a results dict (or its ``summary``) whose arms have ``quality``: ``{variant: [{"steps",
            "fid", "precision", "recall"}, ...]}`` with a stat per metric.
        labels: display names per variant.
    """
    s = _summary(results)
    quality = {v: rows for a in s.values() for v, rows in a.get("quality", {}).items()}
    if not quality:
        raise ValueError("no arm of these results has a 'quality' entry")
    fig = _figure(*size)
    axes = fig.subplots(3, 1, sharex=True)
    for v, rows in quality.items():
        ks = [r["steps"] for r in rows]
        for ax, key in zip(axes, ("fid", "precision", "recall"), strict=True):
            errorbar(ax, ks, [r[key] for r in rows], (labels or {}).get(v, v))
    ylabels = ("digit-FID (lower is better)", "precision", "recall")
    for ax, yl in zip(axes, ylabels, strict=True):
        ax.set_xscale("log")
        ax.set_ylabel(yl, fontsize=FONT)
        _style(ax)
    ks = sorted({r["steps"] for rows in quality.values() for r in rows})
    axes[-1].set_xticks(ks, [str(k) for k in ks])
    axes[-1].minorticks_off()
    axes[0].set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    for fmt in (axes[0].yaxis.set_major_formatter, axes[0].yaxis.set_minor_formatter):
        fmt(ScalarFormatter())  # plain numbers (40, 60), not 4 x 10^1, on the log axis
    axes[-1].set_xlabel("sampling steps K", fontsize=FONT)
    axes[0].legend(fontsize=FONT - 1)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------------------------------------


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def verdict_html(results: Mapping[str, Any]) -> HTML:
    """A results file's claim, verdict and every check (holds, difference, its se and z) as an HTML table."""
    from IPython.display import HTML

    v = results["verdict"]
    rows = "".join(
        "<tr>"
        f"<td>{html.escape(c['check'])}</td>"
        f"<td>{'yes' if c['holds'] else 'no'}</td>"
        f"<td>{_num(c.get('difference'))}</td>"
        f"<td>{_num(c.get('se'))}</td>"
        f"<td>{_num(c.get('z'))}</td>"
        "</tr>"
        for c in v["checks"]
    )
    head = (
        f"<p><b>Claim {html.escape(str(results.get('claim', '?')))}</b>: "
        f"{html.escape(results.get('paper', ''))}"
        f"<br><b>Verdict at the {html.escape(str(results.get('scale', '?')))} scale: "
        f"{html.escape(v['verdict'])}</b> ({v['held']} of {v['of']} checks hold)</p>"
    )
    style = (
        "<style>.iddpm-verdict th,.iddpm-verdict td{padding:0.15em 0.7em;text-align:left;}"
        ".iddpm-verdict td:nth-child(n+3){text-align:right;font-variant-numeric:tabular-nums;}</style>"
    )
    table = (
        '<div style="overflow-x:auto"><table class="iddpm-verdict">'
        "<thead><tr><th>check</th><th>holds</th><th>difference</th><th>se</th><th>z</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div>"
    )
    return HTML(style + head + table)
