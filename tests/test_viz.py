"""Tests for iddpm.viz: grids, frames, scrubber HTML, figures and live controls (no display needed)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

import iddpm
from iddpm import viz

pytest.importorskip("matplotlib")


def _png(value: int) -> bytes:
    """A tiny distinct PNG per value."""
    return viz.images_to_png(torch.full((1, 1, 2, 2), value / 255 * 2 - 1))


def _frames_in(html: str) -> dict:
    pattern = r'<script type="application/json" class="iddpm-scrubber-data">(.*?)</script>'
    data = re.search(pattern, html, re.S)
    assert data, "no frame data in the scrubber"
    return json.loads(data.group(1))


def test_image_grid_layout_and_range() -> None:
    x = torch.stack([torch.full((1, 3, 4), float(v)) for v in (-1.0, 0.0, 1.0)])  # (3, 1, 3, 4)
    grid = viz.image_grid(x, nrow=2, pad=1)
    # 2 rows x 2 columns of 3x4 tiles with 1 white pixel between them; grey images drop the channel axis.
    assert grid.shape == (2 * 4 - 1, 2 * 5 - 1)
    assert grid[0, 0] == 0.0 and grid[0, 5] == 0.5 and grid[4, 0] == 1.0
    assert grid[3, 0] == 1.0  # the padding row is white
    assert np.all(grid[4:, 5:] == 1.0)  # the missing 4th tile is blank
    colour = viz.image_grid(torch.zeros(5, 3, 2, 2))
    assert colour.shape == (2 * 3 - 1, 3 * 3 - 1, 3)


def test_image_grid_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="channels"):
        viz.image_grid(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        viz.image_grid(torch.zeros(1, 1, 1, 2, 2))


def test_images_to_png_scales_pixels() -> None:
    import io

    from matplotlib.image import imread

    png = viz.images_to_png(torch.zeros(1, 1, 3, 5), scale=4)
    assert png.startswith(b"\x89PNG")
    assert imread(io.BytesIO(png)).shape[:2] == (12, 20)


def test_scrubber_has_every_frame_and_label() -> None:
    frames = [_png(v) for v in (0, 100, 200)]
    labels = ["t = 0", "t = 50", "t = 99"]
    html = viz.scrubber(frames, labels, title="noising").data
    data = _frames_in(html)
    assert data["labels"] == labels
    assert data["rows"] == [[base64.b64encode(f).decode() for f in frames]]
    assert 'max="2"' in html and 'data-nframes="3"' in html
    assert ">t = 0</span>" in html  # the initial label is in the HTML itself, before any JS runs
    assert "noising" in html
    assert html.count('class="iddpm-scrubber-img"') == 1


def test_scrubber_id_is_deterministic_and_content_dependent() -> None:
    frames = [_png(v) for v in (0, 100)]
    a = viz.scrubber(frames, ["a", "b"]).data
    b = viz.scrubber(list(frames), ["a", "b"]).data
    c = viz.scrubber(frames, ["a", "c"]).data
    d = viz.scrubber(frames[::-1], ["a", "b"]).data
    ids = [re.search(r'id="(iddpm-scrubber-[0-9a-f]+)"', h).group(1) for h in (a, b, c, d)]
    assert a == b and ids[0] == ids[1]
    assert len({ids[0], ids[2], ids[3]}) == 3
    assert ids[0] in a.split("<script>")[1]  # the script addresses its own scrubber


def test_side_by_side_scrubber_rows() -> None:
    rows = {"linear": [_png(0), _png(10)], "cosine": [_png(20), _png(30)]}
    html = viz.side_by_side_scrubber(rows, ["t = 0", "t = 1"], title="compare").data
    data = _frames_in(html)
    assert len(data["rows"]) == 2 and all(len(r) == 2 for r in data["rows"])
    assert html.count('class="iddpm-scrubber-img"') == 2
    assert html.count('type="range"') == 1  # ONE slider drives both rows
    assert "linear" in html and "cosine" in html


def test_scrubber_validation() -> None:
    with pytest.raises(ValueError, match="labels"):
        viz.side_by_side_scrubber({"a": [_png(0)], "b": [_png(0), _png(1)]}, ["x", "y"])
    with pytest.raises(ValueError, match="PNG"):
        viz.scrubber([b"not a png"], ["x"])
    with pytest.raises(ValueError, match="initial"):
        viz.scrubber([_png(0)], ["x"], initial=1)


def test_scrubber_escapes_script_breakers() -> None:
    html = viz.scrubber([_png(0)], ["</script><b>x"], title="<i>").data
    assert "</script><b>" not in html.split('class="iddpm-scrubber-data">')[1].split("</script>")[0]
    assert _frames_in(html)["labels"] == ["</script><b>x"]
    assert "&lt;i&gt;" in html


def test_noising_frames_use_q_sample_and_one_noise_draw() -> None:
    sched = iddpm.Schedule.named("cosine", 50)
    x0 = torch.linspace(-1, 1, 2 * 16).reshape(2, 1, 4, 4)
    frames = viz.noising_frames(x0, sched, [0, 25, 49], generator=torch.Generator().manual_seed(0), scale=1)
    assert len(frames) == 3 and all(f.startswith(b"\x89PNG") for f in frames)
    assert frames[0] != frames[2]
    again = viz.noising_frames(x0, sched, [0, 25, 49], generator=torch.Generator().manual_seed(0), scale=1)
    assert frames == again
    # Explicit noise: the frame is exactly the picture of q_sample's output.
    from iddpm.diffusion import q_sample

    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    (frame,) = viz.noising_frames(x0, sched, [10], noise=eps, scale=1)
    expected = q_sample(sched, x0, torch.full((2,), 10), eps)
    assert frame == viz.images_to_png(expected, scale=1)


def test_image_and_scatter_frames() -> None:
    assert len(viz.image_frames([torch.zeros(4, 1, 3, 3), torch.ones(4, 1, 3, 3)], nrow=2)) == 2
    clouds = [torch.randn(50, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    frames = viz.scatter_frames(clouds, titles=["a", "b", "c"])
    assert len(frames) == 3 and len(set(frames)) == 3
    with pytest.raises(ValueError, match="titles"):
        viz.scatter_frames(clouds, titles=["a"])


def test_figures_are_returned_not_shown() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    sched = {"linear": iddpm.Schedule.named("linear", 100), "cosine": iddpm.Schedule.named("cosine", 100)}
    before = plt.get_fignums()
    fig = viz.plot_schedules(sched, quantities=("alpha_bar", "betas", "snr"))
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert len(fig.axes[0].lines) == 2
    assert fig.axes[2].get_yscale() == "log"
    stacked = viz.plot_schedules(sched, quantities=("alpha_bar", "betas", "snr"), size=(4.0, 2.0), ncols=1)
    assert len(stacked.axes) == 3 and tuple(stacked.get_size_inches()) == (4.0, 6.0)
    two = viz.plot_schedules(sched, quantities=("alpha_bar", "betas", "snr"), ncols=2)
    assert len(two.axes) == 3  # the unused fourth panel is removed
    pictures = {"a": [torch.zeros(1, 4, 4)] * 3, "b": [torch.ones(1, 4, 4)] * 3}
    rows = viz.plot_image_rows(pictures, ["1", "2", "3"])
    assert len(rows.axes) == 6
    assert isinstance(viz.plot_images(torch.zeros(4, 1, 4, 4), title="x"), Figure)
    assert plt.get_fignums() == before  # nothing registered with pyplot, so nothing is displayed twice
    with pytest.raises(ValueError, match="no field"):
        viz.plot_schedules(sched, quantities=("nope",))


def test_frames_from_figures_sequence_and_function() -> None:
    import matplotlib.pyplot as plt

    figs = [viz.plot_scatter(np.zeros((3, 2)) + i) for i in range(2)]
    assert len(viz.frames_from_figures(figs)) == 2
    pyplot_fig = plt.figure()
    viz.frames_from_figures([pyplot_fig])
    assert not plt.fignum_exists(pyplot_fig.number)  # pyplot figures are closed after rendering
    frames = viz.frames_from_figures(lambda i: viz.plot_scatter(np.full((3, 2), i / 2)), n=3)
    assert len(frames) == 3 and len(set(frames)) == 3
    with pytest.raises(ValueError, match="n"):
        viz.frames_from_figures(lambda i: None)


def test_show_source_is_the_real_code() -> None:
    from iddpm.diffusion import q_sample

    code = viz.show_source(q_sample)
    assert code.data.startswith("def q_sample(")
    assert "sqrt_alpha_bar" in code.data
    with pytest.raises(TypeError):
        viz.show_source(3)


def test_live_wraps_interactive() -> None:
    ipywidgets = pytest.importorskip("ipywidgets")
    calls = []
    w = viz.live(lambda T, s: calls.append((T, s)), T=(10, 100, 10), s=(0.0, 0.1))
    assert isinstance(w, ipywidgets.interactive)
    assert [c.description for c in w.children[:2]] == ["T", "s"]
    assert calls  # interactive calls fn once with the initial values
    with pytest.raises(ValueError, match="LaTeX"):
        viz.live(lambda t: t, t=ipywidgets.IntSlider(description="$t$"))
