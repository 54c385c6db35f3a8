"""Figures for the book's training chapters (5: training a denoiser, 6: learning the variances).

Like :mod:`iddpm.viz`, nothing in the core package imports this module, matplotlib is imported lazily, and
every function returns a ``matplotlib.figure.Figure`` built without pyplot (shown once when it is the last
value of a cell). Multi-panel figures are stacked vertically and at most about 5.5 inches wide, so they stay
readable on a phone-sized (390 px) screen.

* :func:`plot_unet_stages`: channels and resolution of each stage of a UNet forward pass.
* :func:`plot_loss_curve`: a training loss, raw and smoothed.
* :func:`plot_ema_init_share`: how much of its random initialisation an EMA still holds after n steps.
* :func:`plot_interpolation_over_t`: the learned variance interpolation v over t, with its spread.
* :func:`plot_terms_per_t`: per-step terms ``L_t`` of the bound for several models.
* :func:`plot_arm_stats`: a statistic (e.g. held-out NLL) per arm of an experiment, with seeds and errors.
* :func:`plot_quality_vs_steps`: digit-FID / precision / recall against the number of sampling steps K.
* :func:`verdict_lines`: an experiment's verdict and checks as plain text.
* :func:`grey_frames`: compact 8-bit greyscale PNG frames of image batches, for long scrubbers.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .ema import ema_init_weight

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "VARIANT_LABELS",
    "grey_frames",
    "plot_arm_stats",
    "plot_ema_init_share",
    "plot_interpolation_over_t",
    "plot_loss_curve",
    "plot_quality_vs_steps",
    "plot_terms_per_t",
    "plot_unet_stages",
    "running_mean",
    "verdict_lines",
]

WIDTH = 5.2  # inches: one column, readable when scaled to a 390 px screen

# Readable names of the sampling variants of experiments/b_sampling_steps.json (mathtext for the symbols).
VARIANT_LABELS = {
    "hybrid": r"$L_\mathrm{hybrid}$, learned $\Sigma_\theta$",
    "simple-beta": r"$L_\mathrm{simple}$, $\sigma_t^2=\beta_t$",
    "simple-beta-tilde": r"$L_\mathrm{simple}$, $\sigma_t^2=\tilde\beta_t$",
    "ddim": r"DDIM ($\eta=0$) on $L_\mathrm{simple}$",
}


def _figure(height: float, width: float = WIDTH) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def grey_frames(batches: Sequence[Any], nrow: int | None = None) -> list[bytes]:
    """One 8-bit greyscale PNG per batch of grey images ``(B, 1, H, W)`` in [-1, 1], a PNG pixel per pixel.

    The same pictures as :func:`iddpm.viz.image_frames` with ``scale=1``, but a quarter of the bytes (one
    channel instead of RGBA), which matters for a scrubber with a frame per sampling step. Show them enlarged
    with the scrubber's ``width``: its CSS keeps the pixels crisp.
    """
    import io

    from PIL import Image

    from .viz import image_grid

    frames = []
    for b in batches:
        grid = image_grid(b, nrow=nrow)
        if grid.ndim != 2:
            raise ValueError("grey_frames needs 1-channel images")
        buf = io.BytesIO()
        pixels = np.round(grid * 255).astype(np.uint8)
        Image.fromarray(pixels).save(buf, format="PNG", optimize=True)  # 2-D uint8: mode "L"
        frames.append(buf.getvalue())
    return frames


def running_mean(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (shorter at the start), same length as ``values``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    v = _as_array(values)
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def plot_unet_stages(
    names: Sequence[str], shapes: Sequence[Sequence[int]], title: str | None = None
) -> Figure:
    """Channels (bars) and spatial size (label on each bar) of each stage of a forward pass.

    Args:
        names: stage names, in the order the forward pass runs them (e.g. ``input_blocks.0``).
        shapes: the output shape ``(B, C, H, W)`` of each stage.
    """
    if len(names) != len(shapes) or not names:
        raise ValueError(f"need one shape per stage, got {len(names)} names and {len(shapes)} shapes")
    if any(len(s) != 4 for s in shapes):
        raise ValueError("every stage shape must be (B, C, H, W)")
    chans = [int(s[1]) for s in shapes]
    sizes = [int(s[2]) for s in shapes]
    fig = _figure(0.28 * len(names) + 1.0)
    ax = fig.add_subplot()
    levels = sorted(set(sizes), reverse=True)
    colours = {r: f"C{i}" for i, r in enumerate(levels)}
    y = np.arange(len(names))
    ax.barh(y, chans, color=[colours[r] for r in sizes])
    for yi, c, r in zip(y, chans, sizes, strict=True):
        ax.text(c, yi, f" {r}x{r}", va="center", fontsize=9)
    ax.set_yticks(y, names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(chans) * 1.3)
    ax.set_xlabel("channels (label: height x width)")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_loss_curve(
    losses: Mapping[str, Sequence[float] | np.ndarray],
    window: int = 20,
    logy: bool = True,
    title: str | None = None,
) -> Figure:
    """Per-step losses (faint) and their trailing mean over ``window`` steps (solid), one line per name."""
    if not losses:
        raise ValueError("losses is empty")
    fig = _figure(3.0)
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(losses.items()):
        v = _as_array(values)
        steps = np.arange(1, len(v) + 1)
        ax.plot(steps, v, color=f"C{i}", alpha=0.25, lw=0.8)
        ax.plot(steps, running_mean(v, window), color=f"C{i}", label=f"{name} (mean of last {window})")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_ema_init_share(
    rates: Sequence[float] = (0.9999, 0.999),
    max_steps: int = 100_000,
    mark_steps: Sequence[int] = (),
    num: int = 200,
) -> Figure:
    """Share of the random initial weights left in an EMA after n updates, plain (dashed) and with warm-up.

    Computed by :func:`iddpm.ema.ema_init_weight`; ``mark_steps`` draws vertical lines (e.g. a run's length).
    """
    if max_steps < 2:
        raise ValueError(f"max_steps must be >= 2, got {max_steps}")
    steps = np.unique(np.geomspace(1, max_steps, num).astype(int))
    fig = _figure(3.2)
    ax = fig.add_subplot()
    for i, rate in enumerate(rates):
        for warm, style in ((False, "--"), (True, "-")):
            share = [ema_init_weight(rate, int(n), warm) for n in steps]
            label = f"{rate:g}, " + ("with warm-up" if warm else "plain")
            ax.plot(steps, share, style, color=f"C{i}", label=label)
    for n in mark_steps:
        ax.axvline(n, color="0.4", lw=0.8, ls=":")
        ax.text(n, 1.02, f" {n:,}", fontsize=9, color="0.3", transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("training steps n")
    ax.set_ylabel("share of initial weights in the EMA")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, title="EMA rate", title_fontsize=9)
    return fig


def plot_interpolation_over_t(
    t_frac: Any,
    mean: Any,
    lo: Any,
    hi: Any,
    betas: Any,
    betas_tilde: Any,
    sigma2_mean: Any,
    band_label: str = "10-90% of pixels",
) -> Figure:
    """Two stacked panels: the interpolation weight over t (mean and band), and the variance it gives.

    Args:
        t_frac: ``(T,)`` the paper's t / T.
        mean, lo, hi: ``(T,)`` mean and band of the interpolation weight ``(v + 1) / 2`` at each t.
        betas, betas_tilde: ``(T,)`` the two bounds beta_t and beta-tilde_t (beta-tilde_1 clipped).
        sigma2_mean: ``(T,)`` the learned variance (geometric mean over pixels and images).
    """
    t_frac, mean, lo, hi = map(_as_array, (t_frac, mean, lo, hi))
    fig = _figure(6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.fill_between(t_frac, lo, hi, alpha=0.3, color="C0", label=band_label)
    top.plot(t_frac, mean, color="C0", label="mean")
    top.axhline(0, color="C1", lw=0.8, ls="--")
    top.axhline(1, color="C2", lw=0.8, ls="--")
    top.text(1.0, 0.02, r"$\tilde\beta_t$ ", ha="right", va="bottom", color="C1", fontsize=10)
    top.text(1.0, 0.98, r"$\beta_t$ ", ha="right", va="top", color="C2", fontsize=10)
    top.set_ylabel(r"weight on $\beta_t$: $(v+1)/2$")
    top.legend(fontsize=9, loc="center left")
    top.grid(alpha=0.3)
    bottom.plot(t_frac, _as_array(betas), color="C2", ls="--", label=r"$\beta_t$")
    bottom.plot(t_frac, _as_array(betas_tilde), color="C1", ls="--", label=r"$\tilde\beta_t$")
    bottom.plot(t_frac, _as_array(sigma2_mean), color="C0", label=r"learned $\Sigma_\theta$ (geo. mean)")
    bottom.set_yscale("log")
    bottom.set_xlabel("t / T")
    bottom.set_ylabel("variance of the reverse step")
    bottom.legend(fontsize=9)
    bottom.grid(alpha=0.3)
    return fig


def plot_terms_per_t(curves: Mapping[str, Any], title: str | None = None) -> Figure:
    """Two stacked panels: ``L_t`` in bits/dim against t (log scale), and its running sum from t = 0.

    Args:
        curves: ``{label: (T,) L_t in bits/dim, forward time order}`` (column ``k`` of
            :attr:`iddpm.evaluate.BpdResult.terms`, averaged over images).
    """
    if not curves:
        raise ValueError("curves is empty")
    fig = _figure(5.8)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for i, (name, values) in enumerate(curves.items()):
        v = _as_array(values)
        t = np.arange(1, len(v) + 1)
        top.plot(t, np.maximum(v, 1e-6), color=f"C{i}", label=name)
        bottom.plot(t, np.cumsum(v), color=f"C{i}", label=name)
    top.set_yscale("log")
    top.set_ylabel(r"$L_{t-1}$ (bits/dim)")
    top.grid(alpha=0.3)
    top.legend(fontsize=9)
    bottom.set_ylabel(r"$\sum_{s \leq t} L_{s-1}$ (bits/dim)")
    bottom.set_xlabel("diffusion step t")
    bottom.grid(alpha=0.3)
    if title:
        top.set_title(title, fontsize=10)
    return fig


def plot_arm_stats(stats: Mapping[str, Mapping[str, Any]], xlabel: str, title: str | None = None) -> Figure:
    """One horizontal bar per arm: the mean (bar), ± one standard error (line) and each seed's value (dots).

    Args:
        stats: ``{arm: {"mean", "se", "values"}}``, the shape of a results file's summary statistics.
    """
    if not stats:
        raise ValueError("stats is empty")
    names = list(stats)
    fig = _figure(0.5 * len(names) + 1.2)
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        s = stats[name]
        ax.barh(i, s["mean"], color=f"C{i}", alpha=0.6)
        ax.errorbar(s["mean"], i, xerr=s.get("se") or 0.0, color="k", capsize=4)
        vals = s.get("values") or []
        ax.plot(vals, [i] * len(vals), "o", color="k", ms=3)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, axis="x")
    if title:
        ax.set_title(textwrap.fill(title, 55), fontsize=10)
    return fig


def plot_quality_vs_steps(
    summary: Mapping[str, Any],
    metrics: Sequence[str] = ("fid", "precision", "recall"),
    variants: Sequence[str] | None = None,
    full_steps: int | None = None,
) -> Figure:
    """Sample quality against the number of sampling steps K, one stacked panel per metric.

    Args:
        summary: a results file's ``summary`` (``{arm: {"quality": {variant: [{"steps", metric: stats}]}}}``).
        metrics: ``"fid"`` (digit-FID, log scale), ``"precision"``, ``"recall"``.
        variants: which variants to draw, in order (default: every one found).
        full_steps: T, marked with a vertical line (K = T is the unrespaced chain).
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    _plain = FuncFormatter(lambda y, _: f"{y:g}")
    # minor ticks of a log axis: label only 2x and 5x a power of ten, so the labels never crowd
    _plain_25 = FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "25" else "")
    quality = {v: rows for arm in summary.values() for v, rows in arm.get("quality", {}).items()}
    if not quality:
        raise ValueError("the summary has no sample-quality rows")
    names = list(variants) if variants is not None else list(quality)
    missing = [v for v in names if v not in quality]
    if missing:
        raise ValueError(f"variants {missing} not in the results; found {sorted(quality)}")
    ylabels = {"fid": "digit-FID", "precision": "precision", "recall": "recall"}
    fig = _figure(2.3 * len(metrics) + 0.6)
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        for i, v in enumerate(names):
            rows = sorted(quality[v], key=lambda r: r["steps"])
            ks = [r["steps"] for r in rows]
            means = [r[metric]["mean"] for r in rows]
            ses = [r[metric].get("se") or 0.0 for r in rows]
            ax.errorbar(ks, means, yerr=ses, marker="o", ms=4, capsize=3, color=f"C{i}",
                        label=VARIANT_LABELS.get(v, v))  # fmt: skip
        if full_steps:
            ax.axvline(full_steps, color="0.5", lw=0.8, ls=":")
        ax.set_xscale("log")
        ks = sorted({r["steps"] for v in names for r in quality[v]})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if metric == "fid":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_plain)
            ax.yaxis.set_minor_formatter(_plain_25)
        ax.set_ylabel(ylabels.get(metric, metric))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("sampling steps K")
    return fig


def verdict_lines(results: Mapping[str, Any]) -> list[str]:
    """An experiment's verdict and each of its checks, as plain-text lines (from ``results["verdict"]``).

    Each check takes two lines, the check and then its numbers, so that nothing wraps in a narrow output.
    """
    v = results.get("verdict")
    if not v:
        return [f"{results.get('experiment', 'this experiment')}: no verdict recorded"]
    lines = [f"verdict: {v['verdict']} ({v['held']} of {v['of']} checks hold)"]
    for c in v["checks"]:
        mark = "holds " if c["holds"] else "fails "
        detail = f"difference {c['difference']:+.3g}"
        if c.get("se"):
            detail += f" ± {c['se']:.2g} (se)"
        if c.get("z") is not None:
            detail += f", z = {c['z']:.2f}"
        lines += [f"  {mark} {c['check']}", f"         {detail}"]  # two short lines: no wrapping
    return lines
