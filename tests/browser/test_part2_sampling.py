"""Browser checks specific to chapters 7 (importance sampling) and 8 (respacing and fast sampling).

The generic checks of every page (errors, math, figures, scrubbers, widgets, Colab) are in test_book.py; here:
the sampler-weights scrubber and the samples-against-K scrubber change every picture and their label in both
directions, the pages show their figures and verdict tables, and on a 390 px wide phone screen no figure,
scrubber picture or table sticks out of the page.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.browser

CH7 = "book/07_importance_sampling"
CH8 = "book/08_respacing"
PHONE = {"width": 390, "height": 844}

# (page, text in the scrubber's label, number of pictures the slider drives)
SCRUBBERS = [(CH7, "training step", 1), (CH8, "sampling steps", 4)]
MIN_FIGURES = {CH7: 5, CH8: 1}


def _srcs(locator: Any) -> list[str]:
    return [locator.nth(i).get_attribute("src") for i in range(locator.count())]


def _find_scrubber(page: Any, label_text: str) -> Any:
    scrubbers = page.locator("div.iddpm-scrubber")
    for i in range(scrubbers.count()):
        s = scrubbers.nth(i)
        if label_text in (s.locator(".iddpm-scrubber-label").text_content() or ""):
            return s
    pytest.fail(f"no scrubber whose label contains {label_text!r} on {page.url}")


@pytest.mark.parametrize(("page_path", "label_text", "n_pictures"), SCRUBBERS)
def test_scrubber_changes_picture_and_label(
    visit: Any, page_path: str, label_text: str, n_pictures: int
) -> None:
    p = visit(page_path).page
    s = _find_scrubber(p, label_text)
    rng, imgs, label = (
        s.locator("input[type=range]"),
        s.locator("img.iddpm-scrubber-img"),
        s.locator(".iddpm-scrubber-label"),
    )
    assert imgs.count() == n_pictures
    assert int(rng.get_attribute("max")) >= 2, "a scrubber over fewer than 3 frames shows too little"
    rng.scroll_into_view_if_needed()
    rng.focus()
    rng.press("Home")
    first, first_label = _srcs(imgs), label.text_content()
    rng.press("End")
    last, last_label = _srcs(imgs), label.text_content()
    assert all(a != b for a, b in zip(first, last, strict=True)), "a picture did not change with the slider"
    assert first_label != last_label and label_text in last_label
    rng.press("ArrowLeft")  # one frame back: label and pictures follow
    assert label.text_content() not in (first_label, last_label)
    assert _srcs(imgs) != last


@pytest.mark.parametrize("page_path", [CH7, CH8])
def test_figures_and_verdict_table(visit: Any, page_path: str) -> None:
    p = visit(page_path).page
    imgs = p.locator('.cell_output img[src*="_images/"]')
    assert imgs.count() >= MIN_FIGURES[page_path], f"{page_path}: only {imgs.count()} figures"
    tables = p.locator("table.iddpm-verdict")
    assert tables.count() >= 1, f"{page_path}: no verdict table"
    assert "Verdict at the" in p.locator("article").inner_text()


@pytest.fixture(scope="module")
def phone(book_url: str, chromium_browser: Any) -> Iterator[Any]:
    """``phone(page)``: the page loaded in a 390 x 844 viewport (a phone held upright), network blocked."""
    context = chromium_browser.new_context(viewport=PHONE, device_scale_factor=2)
    pages: dict[str, Any] = {}

    def load(page_path: str) -> Any:
        if page_path not in pages:
            page = context.new_page()
            local = (book_url, "data:", "blob:")
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(local) else r.abort())
            page.goto(f"{book_url}{page_path}.html", wait_until="load")
            page.evaluate(DECODE_JS)
            pages[page_path] = page
        return pages[page_path]

    yield load
    context.close()


DECODE_JS = "() => Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))"
OVERFLOW_JS = """() => {
    const vw = document.documentElement.clientWidth;
    const items = Array.from(document.querySelectorAll(
        '.cell_output img, img.iddpm-scrubber-img, input.iddpm-scrubber-range, table.iddpm-verdict'));
    return items.map(e => {
        const r = e.getBoundingClientRect();
        // a wide table may scroll inside its own box; what matters is that the box stays on the page
        const box = e.tagName === 'TABLE' ? e.parentElement.getBoundingClientRect() : r;
        return {tag: e.tagName, cls: e.className, left: box.left, right: box.right, width: r.width, vw: vw};
    });
}"""


@pytest.mark.parametrize("page_path", [CH7, CH8])
def test_fits_a_390px_screen(phone: Any, page_path: str) -> None:
    p = phone(page_path)
    items = p.evaluate(OVERFLOW_JS)
    assert items, f"{page_path}: no figures found at 390 px"
    out = [i for i in items if i["left"] < -1 or i["right"] > i["vw"] + 1]
    assert out == [], f"{page_path}: elements stick out of a 390 px screen: {out}"
    # figures are scaled down to fit, not to nothing: each picture keeps a readable width
    tiny = [i for i in items if i["tag"] == "IMG" and i["width"] < 100]
    assert tiny == [], f"{page_path}: pictures shrunk below 100 px: {tiny}"
