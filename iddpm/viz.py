"""Pictures for the book: figures, image grids, HTML scrubbers and live controls.

Nothing in the core package imports this module. matplotlib and ipywidgets are imported lazily, inside the
functions that need them, so ``import iddpm.viz`` costs nothing and works without the ``[viz]`` extra.

Three kinds of output, and where each one works:

* **Figures** (:func:`plot_schedules`, :func:`plot_images`, :func:`plot_image_rows`, :func:`plot_scatter`):
  ``matplotlib.figure.Figure`` objects built *without* pyplot, so a figure shows exactly once when it is the
  last value of a cell (``%matplotlib inline`` registers the PNG formatter) and never leaks into later cells.
* **Scrubbers** (:func:`scrubber`, :func:`side_by_side_scrubber`): precomputed PNG frames plus a few lines of
  plain JavaScript behind an ``<input type=range>``. They work in the static book (no kernel), in Colab,
  Jupyter and VS Code. Build frames with :func:`noising_frames` (forward process), :func:`image_frames` (any
  list of image batches, e.g. a denoising trajectory), :func:`scatter_frames` (2-D point clouds) or
  :func:`frames_from_figures` (anything matplotlib draws).
* **Live controls** (:func:`live`): a thin ``ipywidgets.interactive`` wrapper for what needs a kernel (your
  own seed, your own schedule parameters). In the static book such a widget is frozen, so the book pattern is:
  tag the live cell ``remove-output`` (or put a ``{note}`` "run this chapter on Colab to interact" next to it)
  and follow it with a static, precomputed version (a scrubber or a figure) of the same exploration.

Works with ipywidgets 7.7 (Colab) and 8: no ``Stack``, no ``Play``, no LaTeX in widget descriptions (widgets
call MathJax 2, which the book's MathJax 3 pages don't have). Scrubber labels are plain text for the same
reason: write ``"t = 250"``, not ``"$t=250$"``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import inspect
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

if TYPE_CHECKING:  # only for type hints; matplotlib stays an optional, lazily imported dependency
    from IPython.display import HTML, Code
    from matplotlib.figure import Figure

    from .schedules import Schedule

__all__ = [
    "fig_to_png",
    "frames_from_figures",
    "image_frames",
    "image_grid",
    "images_to_png",
    "live",
    "noising_frames",
    "plot_image_rows",
    "plot_images",
    "plot_scatter",
    "plot_schedules",
    "scatter_frames",
    "scrubber",
    "scrubber_html",
    "show_source",
    "side_by_side_scrubber",
]

Frame = bytes | str  # PNG bytes, or an already base64-encoded PNG (what a scrubber embeds)


# ----------------------------------------------------------------------------------------------------------
# Source and images
# ----------------------------------------------------------------------------------------------------------


def show_source(obj: Any) -> Code:
    """The real source code of a function, class or module, syntax-highlighted in a notebook.

    The book shows the package's code with this instead of copying it, so the page can never drift from what
    ships. Works on Colab too (where ``literalinclude`` would not).
    """
    from IPython.display import Code

    try:
        source = inspect.getsource(obj)
    except (TypeError, OSError) as err:
        raise TypeError(f"cannot show the source of {obj!r}: {err}") from err
    return Code(source, language="python")


def _as_numpy_images(x: Tensor | np.ndarray) -> np.ndarray:
    """``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)`` in [-1, 1] -> float ``(B, C, H, W)`` numpy in [0, 1]."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), (C, H, W) or (H, W); got shape {x.shape}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (dim 1), got shape {x.shape}")
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


def image_grid(x: Tensor | np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile a batch of images into one picture.

    Args:
        x: ``(B, C, H, W)`` with C = 1 or 3, scaled to [-1, 1] (the package's convention); a single image
            ``(C, H, W)`` or ``(H, W)`` also works.
        nrow: images per row; default ``ceil(sqrt(B))``. The last row is padded with blank (white) tiles.
        pad: white pixels between tiles.

    Returns:
        float32 in [0, 1]: ``(rows*(H+pad)-pad, cols*(W+pad)-pad)`` for grey images, with a trailing ``3``
        for colour, ready for ``imshow`` (use ``cmap="gray", vmin=0, vmax=1`` for grey).
    """
    imgs = _as_numpy_images(x)
    b, c, h, w = imgs.shape
    cols = nrow or math.ceil(math.sqrt(b))
    if cols < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = math.ceil(b / cols)
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    # Pad every tile on the bottom/right and add blank tiles so the batch fills the grid; crop the outer pad.
    tiles = np.ones((rows * cols, c, h + pad, w + pad), dtype=np.float32)
    tiles[:b, :, :h, :w] = imgs
    grid = rearrange(tiles, "(r k) c h w -> (r h) (k w) c", r=rows, k=cols)
    grid = grid[: rows * (h + pad) - pad, : cols * (w + pad) - pad]
    return grid[..., 0] if c == 1 else grid


def images_to_png(x: Tensor | np.ndarray, nrow: int | None = None, scale: int = 1, pad: int = 1) -> bytes:
    """A PNG of :func:`image_grid`, each pixel repeated ``scale`` times (crisp, no interpolation)."""
    from matplotlib.image import imsave

    grid = image_grid(x, nrow=nrow, pad=pad)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    if grid.ndim == 2:
        imsave(buf, grid, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    else:
        imsave(buf, grid, format="png")
    return buf.getvalue()


def fig_to_png(fig: Figure, dpi: int = 80) -> bytes:
    """Render a matplotlib figure to PNG bytes (closing it if pyplot manages it, so it isn't shown twice)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    if plt.fignum_exists(getattr(fig, "number", -1)):
        plt.close(fig)
    return buf.getvalue()


def frames_from_figures(
    figs: Sequence[Figure] | Callable[[int], Figure], n: int | None = None, dpi: int = 80
) -> list[bytes]:
    """PNG frames from figures: a sequence of figures, or a function ``i -> Figure`` called for ``i < n``.

    The function form draws one figure at a time, so a long animation never holds every figure in memory.

    Returns:
        ``list[bytes]``, one PNG per frame.
    """
    if callable(figs):
        if n is None:
            raise ValueError("pass n (the number of frames) when figs is a function")
        return [fig_to_png(figs(i), dpi=dpi) for i in range(n)]
    return [fig_to_png(f, dpi=dpi) for f in figs]


def _new_figure(figsize: tuple[float, float]) -> Figure:
    # Figure() instead of plt.figure(): not registered with pyplot, so it is displayed only when returned.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def plot_images(
    x: Tensor | np.ndarray, nrow: int | None = None, title: str | None = None, size: float = 3.0
) -> Figure:
    """A figure showing a batch of images as one grid (see :func:`image_grid`)."""
    grid = image_grid(x, nrow=nrow)
    fig = _new_figure((size * grid.shape[1] / grid.shape[0], size))
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def plot_image_rows(
    rows: Mapping[str, Sequence[Tensor | np.ndarray]],
    col_labels: Sequence[str] | None = None,
    nrow: int | None = None,
    size: float = 1.4,
) -> Figure:
    """A table of pictures: one row per name (e.g. a schedule), one column per setting (e.g. a timestep).

    Args:
        rows: ``{row label: [images for column 0, column 1, ...]}``; each entry is anything :func:`image_grid`
            takes. Every row must have the same number of columns.
        col_labels: plain-text column titles (matplotlib renders ``$...$`` mathtext if you want symbols).
        nrow: passed to :func:`image_grid` for batches.
        size: inches per cell.
    """
    names = list(rows)
    if not names:
        raise ValueError("rows is empty")
    ncols = len(rows[names[0]])
    if any(len(rows[n]) != ncols for n in names):
        raise ValueError(f"every row needs the same number of columns; got {[len(rows[n]) for n in names]}")
    if col_labels is not None and len(col_labels) != ncols:
        raise ValueError(f"{len(col_labels)} column labels for {ncols} columns")
    fig = _new_figure((size * ncols + 0.8, size * len(names)))
    axes = fig.subplots(len(names), ncols, squeeze=False)
    for i, name in enumerate(names):
        for j, img in enumerate(rows[name]):
            grid = image_grid(img, nrow=nrow)
            ax = axes[i, j]
            ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=11)
            if i == 0 and col_labels is not None:
                ax.set_title(col_labels[j], fontsize=11)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------

_YLABELS = {
    "alpha_bar": r"$\bar\alpha_t$",
    "betas": r"$\beta_t$",
    "snr": r"SNR $=\bar\alpha_t/(1-\bar\alpha_t)$",
    "sqrt_alpha_bar": r"$\sqrt{\bar\alpha_t}$",
    "sqrt_one_minus_alpha_bar": r"$\sqrt{1-\bar\alpha_t}$",
    "posterior_var": r"$\tilde\beta_t$",
}


def plot_schedules(
    schedules: Mapping[str, Schedule],
    quantities: Sequence[str] = ("alpha_bar", "betas"),
    x: str = "fraction",
    log: Sequence[str] = ("snr",),
    size: tuple[float, float] = (4.0, 3.0),
    ncols: int | None = None,
) -> Figure:
    """Plot per-timestep quantities of several schedules, one panel per quantity.

    Args:
        schedules: ``{label: Schedule}``, e.g. ``{"linear": ..., "cosine": ...}``.
        quantities: names of ``Schedule`` fields (``"alpha_bar"``, ``"betas"``, ``"snr"``, ...).
        x: ``"fraction"`` plots against ``(t + 1) / T`` (the paper's t/T, so chains of different T line up) or
            ``"t"`` against the 0-based index.
        log: quantities drawn on a log y axis.
        size: inches per panel.
        ncols: panels per row (default: all in one row); ``ncols=1`` stacks them, which stays readable on a
            phone-sized screen.
    """
    if x not in ("fraction", "t"):
        raise ValueError(f"x must be 'fraction' or 't', got {x!r}")
    if not schedules:
        raise ValueError("schedules is empty")
    ncols = len(quantities) if ncols is None else max(1, min(ncols, len(quantities)))
    nrows = -(-len(quantities) // ncols)
    fig = _new_figure((size[0] * ncols, size[1] * nrows))
    all_axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in all_axes[len(quantities) :]:
        ax.remove()
    axes = all_axes[: len(quantities)]
    for ax, q in zip(axes, quantities, strict=True):
        for label, s in schedules.items():
            if not hasattr(s, q):
                raise ValueError(f"a Schedule has no field {q!r}")
            values = getattr(s, q).detach().cpu().double().numpy()
            steps = np.arange(len(values))
            xs = (steps + 1) / len(values) if x == "fraction" else steps
            ax.plot(xs, values, label=label)
        if q in log:
            ax.set_yscale("log")
        ax.set_xlabel("t / T" if x == "fraction" else "t (0-based)")
        ax.set_ylabel(_YLABELS.get(q, q))
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


# ----------------------------------------------------------------------------------------------------------
# Frames for scrubbers
# ----------------------------------------------------------------------------------------------------------


def noising_frames(
    x0: Tensor,
    schedule: Schedule,
    ts: Sequence[int],
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    nrow: int | None = None,
    scale: int = 2,
) -> list[bytes]:
    """PNG frames of ``x_t ~ q(x_t | x_0)`` at each ``t`` in ``ts``, with **one** noise draw for all frames.

    Using the same ``eps`` for every t makes the scrubber show one image dissolving smoothly (what
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` means for a fixed eps) instead of flickering.

    Args:
        x0: ``(B, C, H, W)`` clean images in [-1, 1].
        schedule: the :class:`~iddpm.schedules.Schedule`.
        ts: 0-based timesteps, each in ``[0, T)``.
        generator: draws ``eps`` (on the CPU, so the pictures are the same on every device).
        noise: ``eps`` itself, of ``x0``'s shape; overrides ``generator``.
        nrow, scale: layout, see :func:`images_to_png`.

    Returns:
        ``list[bytes]``, one PNG per t (ready for :func:`scrubber`).
    """
    from .diffusion import q_sample

    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    frames = []
    for t in ts:
        t_batch = torch.full((x0.shape[0],), int(t), dtype=torch.int64, device=x0.device)
        frames.append(images_to_png(q_sample(schedule, x0, t_batch, noise), nrow=nrow, scale=scale))
    return frames


def image_frames(
    batches: Sequence[Tensor | np.ndarray], nrow: int | None = None, scale: int = 2
) -> list[bytes]:
    """PNG frames from a sequence of image batches, e.g. the ``x_t`` or ``pred_x0`` along a trajectory."""
    return [images_to_png(b, nrow=nrow, scale=scale) for b in batches]


def plot_scatter(
    points: Tensor | np.ndarray,
    lim: float = 3.0,
    title: str | None = None,
    size: float = 3.0,
    color: str = "C0",
) -> Figure:
    """A square scatter plot of ``(N, 2)`` points with fixed limits ``[-lim, lim]`` (so frames line up)."""
    p = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got shape {p.shape}")
    fig = _new_figure((size, size))
    ax = fig.add_subplot()
    ax.scatter(p[:, 0], p[:, 1], s=3, alpha=0.5, color=color, linewidths=0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return fig


def scatter_frames(
    clouds: Sequence[Tensor | np.ndarray],
    lim: float = 3.0,
    titles: Sequence[str] | None = None,
    size: float = 3.0,
    dpi: int = 70,
) -> list[bytes]:
    """PNG frames of 2-D point clouds (e.g. a toy data set being noised), with the same axes in each frame."""
    if titles is not None and len(titles) != len(clouds):
        raise ValueError(f"{len(titles)} titles for {len(clouds)} clouds")
    return [
        fig_to_png(plot_scatter(c, lim=lim, title=titles[i] if titles else None, size=size), dpi=dpi)
        for i, c in enumerate(clouds)
    ]


# ----------------------------------------------------------------------------------------------------------
# Scrubbers: precomputed frames + plain JS
# ----------------------------------------------------------------------------------------------------------

_CSS = """
.iddpm-scrubber{font-family:sans-serif;font-size:14px;margin:0.5em 0;}
.iddpm-scrubber-title{font-weight:bold;margin-bottom:0.3em;}
.iddpm-scrubber-rows{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start;}
.iddpm-scrubber-row{display:flex;flex-direction:column;align-items:center;}
.iddpm-scrubber-img{image-rendering:pixelated;max-width:100%;}
.iddpm-scrubber-controls{display:flex;align-items:center;gap:0.8em;margin-top:0.3em;}
.iddpm-scrubber-range{width:min(420px,70%);}
"""

# One copy of this script per scrubber; it initialises every not-yet-initialised scrubber with this id, so a
# scrubber displayed twice on a page works twice. ES5 only, no library: it must run in any notebook front end.
_JS = """
(function () {
  var roots = document.querySelectorAll('div[data-iddpm-scrubber="%(id)s"]');
  for (var r = 0; r < roots.length; r++) {
    var root = roots[r];
    if (root.getAttribute('data-ready') === '1') { continue; }
    var data = JSON.parse(root.querySelector('script.iddpm-scrubber-data').textContent);
    var imgs = root.querySelectorAll('img.iddpm-scrubber-img');
    var range = root.querySelector('input.iddpm-scrubber-range');
    var label = root.querySelector('.iddpm-scrubber-label');
    var show = (function (data, imgs, label) {
      return function (i) {
        for (var k = 0; k < imgs.length; k++) {
          imgs[k].src = 'data:image/png;base64,' + data.rows[k][i];
        }
        label.textContent = data.labels[i];
      };
    })(data, imgs, label);
    range.addEventListener('input', (function (show) {
      return function (e) { show(parseInt(e.target.value, 10)); };
    })(show));
    show(parseInt(range.value, 10));
    root.setAttribute('data-ready', '1');
  }
})();
"""


def _b64(frame: Frame) -> str:
    if isinstance(frame, bytes | bytearray):
        if not frame.startswith(b"\x89PNG"):
            raise ValueError("frames must be PNG bytes (see fig_to_png / images_to_png)")
        return base64.b64encode(frame).decode("ascii")
    if isinstance(frame, str):
        return frame
    raise TypeError(f"a frame must be PNG bytes or a base64 str, got {type(frame).__name__}")


def scrubber_html(
    rows: Mapping[str, Sequence[Frame]],
    labels: Sequence[str],
    title: str | None = None,
    initial: int = 0,
    width: int | None = None,
) -> str:
    """The HTML of a scrubber: one slider that drives one picture per row. See :func:`side_by_side_scrubber`.

    The element id is a hash of the content (frames, labels, title, initial frame), so re-running a notebook
    gives byte-identical HTML (no random uuid churn) and two different scrubbers never share an id.
    """
    if not rows:
        raise ValueError("a scrubber needs at least one row of frames")
    names = list(rows)
    encoded = [[_b64(f) for f in rows[n]] for n in names]
    n = len(labels)
    if n == 0:
        raise ValueError("a scrubber needs at least one frame")
    for name, frames in zip(names, encoded, strict=True):
        if len(frames) != n:
            raise ValueError(f"row {name!r} has {len(frames)} frames but there are {n} labels")
    if not 0 <= initial < n:
        raise ValueError(f"initial must be in [0, {n}), got {initial}")
    payload = {"labels": [str(lab) for lab in labels], "rows": encoded}
    blob = json.dumps(payload, separators=(",", ":"))
    digest = hashlib.sha1(
        json.dumps([names, title, initial, width]).encode() + blob.encode(), usedforsecurity=False
    ).hexdigest()[:16]
    sid = f"iddpm-scrubber-{digest}"
    # "</" inside a <script> would end it early; JSON allows the escaped form "<\/".
    blob = blob.replace("</", "<\\/")
    size = f' width="{int(width)}"' if width else ""
    row_html = "".join(
        '<div class="iddpm-scrubber-row">'
        + (
            f'<div class="iddpm-scrubber-rowlabel">{html.escape(name)}</div>'
            if len(names) > 1 or name
            else ""
        )
        + f'<img class="iddpm-scrubber-img" alt="{html.escape(name or "frame")}"{size} '
        f'src="data:image/png;base64,{frames[initial]}"></div>'
        for name, frames in zip(names, encoded, strict=True)
    )
    title_html = f'<div class="iddpm-scrubber-title">{html.escape(title)}</div>' if title else ""
    return (
        f"<style>{_CSS}</style>"
        f'<div class="iddpm-scrubber" id="{sid}" data-iddpm-scrubber="{sid}" data-nframes="{n}">'
        f"{title_html}"
        f'<div class="iddpm-scrubber-rows">{row_html}</div>'
        '<div class="iddpm-scrubber-controls">'
        f'<input type="range" class="iddpm-scrubber-range" min="0" max="{n - 1}" step="1" value="{initial}" '
        f'aria-label="{html.escape(title or "frame")}">'
        f'<span class="iddpm-scrubber-label">{html.escape(str(labels[initial]))}</span>'
        "</div>"
        f'<script type="application/json" class="iddpm-scrubber-data">{blob}</script>'
        f"<script>{_JS % {'id': sid}}</script>"
        "</div>"
    )


def scrubber(
    frames: Sequence[Frame],
    labels: Sequence[str],
    title: str | None = None,
    initial: int = 0,
    width: int | None = None,
) -> HTML:
    """A slider over precomputed frames that works without a kernel (static book, Colab, Jupyter).

    Args:
        frames: PNG bytes per frame (from :func:`noising_frames`, :func:`image_frames`,
            :func:`scatter_frames`, :func:`frames_from_figures`, ...).
        labels: plain text shown next to the slider for each frame, e.g. ``"t = 250"``.
        title: plain-text title above the picture.
        initial: the frame shown first.
        width: display width in CSS pixels (default: the PNG's own size).

    Returns:
        An ``IPython.display.HTML``; its ``.data`` is the HTML string.
    """
    from IPython.display import HTML

    return HTML(scrubber_html({"": frames}, labels, title=title, initial=initial, width=width))


def side_by_side_scrubber(
    rows: Mapping[str, Sequence[Frame]],
    labels: Sequence[str],
    title: str | None = None,
    initial: int = 0,
    width: int | None = None,
) -> HTML:
    """Several pictures driven by ONE slider, e.g. the linear and the cosine schedule at the same t.

    Args:
        rows: ``{caption: frames}``; every entry must have ``len(labels)`` frames.
        labels, title, initial, width: as in :func:`scrubber`.
    """
    from IPython.display import HTML

    return HTML(scrubber_html(rows, labels, title=title, initial=initial, width=width))


# ----------------------------------------------------------------------------------------------------------
# Live controls (need a kernel)
# ----------------------------------------------------------------------------------------------------------


def live(fn: Callable[..., Any], **controls: Any) -> Any:
    """Live controls for ``fn``: ``ipywidgets.interactive(fn, **controls)``, returned for display.

    Controls use ipywidgets' abbreviations, which are the same in ipywidgets 7 and 8: ``(lo, hi)`` or
    ``(lo, hi, step)`` for a slider (ints give an IntSlider), a list for a dropdown, a bool for a checkbox, or
    any widget. If ``fn`` returns a matplotlib Figure it is displayed below the controls.

    In the static book the widget is frozen (there is no kernel), so pair it with a precomputed version: tag
    the live cell ``remove-output`` and show a scrubber or figure of the same exploration after it.

    Raises:
        ImportError: with an install hint when ipywidgets is missing.
    """
    try:
        import ipywidgets
    except ImportError as err:
        raise ImportError('live controls need ipywidgets: pip install "iddpm[viz]"') from err
    for name, value in controls.items():
        # ipywidgets typesets $...$ in descriptions through MathJax 2, which throws on MathJax 3 pages.
        if "$" in str(getattr(value, "description", "")):
            raise ValueError(f"control {name!r}: no LaTeX in widget descriptions; write plain text")
    # The second positional argument is interactive's options dict in ipywidgets 7 and 8 alike; auto_display
    # shows fn's return value (e.g. a Figure) under the controls, as `interact` does.
    return ipywidgets.interactive(fn, {"auto_display": True}, **controls)
