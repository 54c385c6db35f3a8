"""Browser tests of the built book: every page listed in _toc.yml, loaded in a hermetic chromium.

Per page: no unexpected JS errors, no request leaves the machine, math is typeset, the figures are there,
every scrubber (and jshtml animation) changes its picture when moved, widgets render, Colab links exist.
Chapters added to _toc.yml are tested automatically.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]

# `page` (every page of _toc.yml) and `notebook` (the notebook chapters) are parametrized in conftest.py.

# The least number of static matplotlib figures each chapter must show (a chapter not listed: at least one).
# Building with MPLBACKEND=agg and no `%matplotlib inline` silently drops them all; this catches it.
MIN_FIGURES = {
    "book/01_forward_process": 3,
    "book/02_noise_schedules": 2,
    "book/03_reverse_process": 5,
    "book/04_variational_bound": 4,
}
# The least number of scrubbers each chapter must have (a chapter not listed: any number, each must work).
MIN_SCRUBBERS = {
    "book/01_forward_process": 1,
    "book/02_noise_schedules": 3,
    "book/03_reverse_process": 3,
    "book/04_variational_bound": 1,
}


def _srcs(locator: Any) -> list[str]:
    return [locator.nth(i).get_attribute("src") for i in range(locator.count())]


def test_no_unexpected_errors(visit: Any, page: str) -> None:
    v = visit(page)
    assert v.unexpected_errors() == [], f"{page}: unexpected errors in the browser"


def test_no_external_requests(visit: Any, page: str) -> None:
    v = visit(page)
    assert v.external_requests == [], f"{page} tried to reach the network (blocked): {v.external_requests}"


def test_math_is_typeset(visit: Any, page: str) -> None:
    p = visit(page).page
    n_math = p.locator(".math").count()
    if n_math == 0:
        pytest.skip(f"{page} has no math")
    untypeset = p.evaluate(
        "() => Array.from(document.querySelectorAll('.math'))"
        ".filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60))"
    )
    assert p.locator("mjx-container").count() >= n_math
    assert untypeset == [], f"{page}: math left raw (MathJax did not load?)"


# Math that MyST did not parse shows up as literal dollars in the page text: a `$$` (e.g. a display block
# inside a list item) or a `$...$` pair. Code and cell outputs are excluded, where dollars are legitimate.
RAW_MATH = re.compile(r"\$\$|\$[^$]{1,300}\$")
PROSE_TEXT_JS = """() => {
    const article = document.querySelector('article').cloneNode(true);
    article.querySelectorAll('pre, code, .cell_output, .math, mjx-container, script, style')
        .forEach(e => e.remove());
    return article.textContent;
}"""


def test_no_raw_math_in_text(visit: Any, page: str) -> None:
    text = visit(page).page.evaluate(PROSE_TEXT_JS)
    raw = [text[max(m.start() - 40, 0) : m.end() + 40] for m in RAW_MATH.finditer(text)]
    assert raw == [], f"{page}: unrendered math (stray $$ or $...$) in the text: {raw}"


def test_figures_render(visit: Any, notebook: str) -> None:
    page = notebook
    p = visit(page).page
    imgs = p.locator('.cell_output img[src*="_images/"]')
    p.evaluate("() => Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")
    widths = [imgs.nth(i).evaluate("i => i.naturalWidth") for i in range(imgs.count())]
    assert len(widths) >= MIN_FIGURES.get(page, 1), f"{page}: only {len(widths)} figures"
    assert all(w > 0 for w in widths), f"{page}: broken figure images (naturalWidth {widths})"


def test_every_scrubber_moves(visit: Any, notebook: str) -> None:
    page = notebook
    p = visit(page).page
    scrubbers = p.locator("div.iddpm-scrubber")
    n = scrubbers.count()
    assert n >= MIN_SCRUBBERS.get(page, 0), f"{page}: {n} scrubbers"
    for i in range(n):
        s = scrubbers.nth(i)
        rng, imgs, label = (
            s.locator("input[type=range]"),
            s.locator("img.iddpm-scrubber-img"),
            s.locator(".iddpm-scrubber-label"),
        )
        assert s.get_attribute("data-ready") == "1", f"{page}: scrubber {i}'s script did not run"
        before, label_before = _srcs(imgs), label.text_content()
        rng.scroll_into_view_if_needed()
        rng.focus()
        rng.press("End")  # the real keyboard path: the browser moves the slider and fires `input`
        after = _srcs(imgs)
        assert rng.input_value() == rng.get_attribute("max")
        changed = [a != b for a, b in zip(after, before, strict=True)]
        assert all(changed), f"{page}: scrubber {i} picture unchanged (per row: {changed})"
        assert label.text_content() != label_before, f"{page}: scrubber {i} label unchanged"
        rng.press("Home")  # back to frame 0: the picture must follow the slider both ways
        assert rng.input_value() == rng.get_attribute("min")
        assert _srcs(imgs) != after, f"{page}: scrubber {i} picture did not follow the slider back"
        if rng.get_attribute("value") == rng.get_attribute("min"):  # started at frame 0: back where it began
            assert _srcs(imgs) == before and label.text_content() == label_before


def test_jshtml_animations_move(visit: Any, notebook: str) -> None:
    page = notebook
    p = visit(page).page
    anims = p.locator("div.animation")
    if anims.count() == 0:
        pytest.skip(f"{page} has no jshtml animation")
    for i in range(anims.count()):
        a = anims.nth(i)
        img, rng = a.locator("img").first, a.locator("input[type=range]").first
        before = img.get_attribute("src")
        rng.focus()
        rng.press("End")
        assert img.get_attribute("src") != before, f"{page}: animation {i} frame unchanged"


def test_widgets_render(visit: Any, notebook: str) -> None:
    page = notebook
    p = visit(page).page
    views = p.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
    if views == 0:
        pytest.skip(f"{page} displays no widget")
    rendered = p.locator(".jupyter-widgets").count()
    assert rendered >= views, f"{page}: {views} widget outputs but {rendered} rendered widgets"


def test_colab_launch_link(visit: Any, notebook: str) -> None:
    page = notebook
    p = visit(page).page
    import yaml

    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    owner_name = repo["url"].rstrip("/").removeprefix("https://github.com/")
    href = f"https://colab.research.google.com/github/{owner_name}/blob/{repo['branch']}/{page}.ipynb"
    assert p.locator(f'a[href="{href}"]').count() >= 1, f"{page}: no Colab launch link to {href}"


def test_colab_bootstrap_cell_is_hidden(visit: Any, notebook: str) -> None:
    text = visit(notebook).page.locator("article").inner_text()
    assert "google.colab" not in text, f"{notebook}: the Colab bootstrap cell (tag remove-cell) is visible"
    assert "NBVAL" not in text, f"{notebook}: nbval markers must be cell tags, not comments"


def test_intro_has_bibliography(visit: Any, root_page: str) -> None:
    p = visit(root_page).page
    text = p.locator("article").inner_text()
    assert "Improved Denoising Diffusion Probabilistic Models" in text
    assert p.locator("a[href*='#id']").count() + p.locator(".citation").count() > 0
