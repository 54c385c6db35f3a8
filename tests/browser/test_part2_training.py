"""Browser checks specific to chapters 5 (training) and 6 (learned variances), on top of test_book.py's.

* Chapter 5's reverse-process scrubber shows x_t and the predicted x_0 side by side: moving its slider must
  change both pictures and the label, to a frame in the middle as well as to the ends.
* Chapter 5's samples-over-training scrubber changes picture and label.
* On a 390 px wide (phone) viewport, every figure of both chapters fits the screen without being shrunk so
  much that its text becomes unreadable, and the page does not scroll sideways.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.browser

CH5, CH6 = "book/05_training", "book/06_learned_variances"
MIN_FIGURES = {CH5: 7, CH6: 6}
PHONE = {"width": 390, "height": 844}
# A figure is drawn at 100 dpi with 9-11 pt text; shown at no less than 0.6 of its natural size, its smallest
# text stays at about 8 CSS px. Wider (side-by-side) figures would fall below this on a phone.
MIN_SCALE = 0.6


def _scrubber(p: Any, title: str) -> Any:
    s = p.locator("div.iddpm-scrubber", has=p.locator(".iddpm-scrubber-title", has_text=title))
    assert s.count() == 1, f"expected one scrubber titled {title!r}, found {s.count()}"
    return s.first


def _srcs(s: Any) -> list[str]:
    imgs = s.locator("img.iddpm-scrubber-img")
    return [imgs.nth(i).get_attribute("src") for i in range(imgs.count())]


def _initial(s: Any) -> int:
    """The frame a scrubber shows on load (its ``value`` attribute; the ``.value`` property moves)."""
    return int(s.locator("input[type=range]").get_attribute("value"))


def _set(s: Any, value: int) -> None:
    """Move a scrubber's slider to ``value`` the way a drag does (value change + an ``input`` event)."""
    s.locator("input[type=range]").evaluate(
        "(r, v) => { r.value = String(v); r.dispatchEvent(new Event('input', {bubbles: true})); }", value
    )


def test_reverse_process_scrubber_shows_x_t_and_pred_x0(visit: Any) -> None:
    p = visit(CH5).page
    s = _scrubber(p, "reverse process")
    assert s.locator("img.iddpm-scrubber-img").count() == 2
    assert [t.strip() for t in s.locator(".iddpm-scrubber-rowlabel").all_text_contents()] == [
        "x_t",
        "predicted x_0",
    ]
    label = s.locator(".iddpm-scrubber-label")
    n = int(s.get_attribute("data-nframes"))
    assert n >= 2
    seen = []
    for frame in (0, n // 2, n - 1):
        _set(s, frame)
        seen.append((_srcs(s), label.text_content()))
    _set(s, _initial(s))  # leave the (cached, shared) page as it was loaded
    for (src_a, lab_a), (src_b, lab_b) in zip(seen[:-1], seen[1:], strict=True):
        assert all(a != b for a, b in zip(src_a, src_b, strict=True)), "a picture did not change"
        assert lab_a != lab_b, "the label did not change"
    assert seen[0][1].startswith("t = ") and seen[-1][1].startswith("t = 0 ")  # the last frame is x_0


def test_training_scrubber_changes(visit: Any) -> None:
    p = visit(CH5).page
    s = _scrubber(p, "EMA samples during the live run")
    label = s.locator(".iddpm-scrubber-label")
    before = (_srcs(s), label.text_content())
    _set(s, int(s.get_attribute("data-nframes")) - 1)
    after = (_srcs(s), label.text_content())
    _set(s, _initial(s))  # leave the (cached, shared) page as it was loaded
    assert after[0] != before[0] and after[1] != before[1]
    assert "training steps" in after[1]


@pytest.mark.parametrize("chapter", [CH5, CH6])
def test_enough_figures(visit: Any, chapter: str) -> None:
    page = chapter
    n = visit(page).page.locator('.cell_output img[src*="_images/"]').count()
    assert n >= MIN_FIGURES[page], f"{page}: {n} figures"


@pytest.fixture(scope="module")
def phone(book_url: str, chromium_browser: Any) -> Iterator[Any]:
    """Load a page at a 390 px wide viewport, with every request off the machine aborted."""
    context = chromium_browser.new_context(viewport=PHONE, device_scale_factor=2)

    def load(page_path: str) -> Any:
        page = context.new_page()
        page.route(
            "**/*",
            lambda r: r.continue_() if r.request.url.startswith((book_url, "data:", "blob:")) else r.abort(),
        )
        page.goto(f"{book_url}{page_path}.html", wait_until="load")
        page.evaluate("() => Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")
        return page

    yield load
    context.close()


@pytest.mark.parametrize("chapter", [CH5, CH6])
def test_figures_fit_a_390px_screen(phone: Any, chapter: str) -> None:
    page = chapter
    p = phone(page)
    figs = p.evaluate(
        """() => Array.from(document.querySelectorAll('.cell_output img[src*="_images/"]')).map(i => {
            const r = i.getBoundingClientRect();
            return {src: i.getAttribute('src'), left: r.left, right: r.right, width: r.width,
                    natural: i.naturalWidth};
        })"""
    )
    assert len(figs) >= MIN_FIGURES[page]
    for f in figs:
        assert f["natural"] > 0, f"{page}: broken figure {f['src']}"
        assert f["left"] >= -1 and f["right"] <= PHONE["width"] + 1, f"{page}: {f['src']} overflows: {f}"
        # naturalWidth is in device pixels of the PNG; matplotlib-inline PNGs are shown at their pixel size,
        # shrunk to the column when wider.
        scale = f["width"] / f["natural"]
        assert scale >= MIN_SCALE, f"{page}: {f['src']} is shown at {scale:.2f} of its size: text unreadable"
    overflow = p.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"{page}: the page scrolls sideways by {overflow} px on a 390 px screen"


@pytest.mark.parametrize("chapter", [CH5])
def test_scrubbers_fit_a_390px_screen(phone: Any, chapter: str) -> None:
    page = chapter
    p = phone(page)
    boxes = p.evaluate(
        """() => Array.from(document.querySelectorAll('img.iddpm-scrubber-img, input.iddpm-scrubber-range'))
            .map(e => e.getBoundingClientRect().right)"""
    )
    assert boxes and max(boxes) <= PHONE["width"] + 1, f"{page}: a scrubber is wider than the screen: {boxes}"
