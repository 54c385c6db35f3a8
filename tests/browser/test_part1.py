"""Browser checks of the book's shared page infrastructure and of part I (chapters 1-4).

Every page: no sphinx-thebe script (it was included twice), a favicon that loads, source listings that never
wrap. Part I: no MyST-only markup left raw (it would also show raw on Colab), exercise solutions in <details>,
no widget manager (and so no font requests) on pages without live widgets, and figures that stay readable on a
390 px wide phone screen.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

pytestmark = pytest.mark.browser

PART1 = [
    "book/01_forward_process",
    "book/02_noise_schedules",
    "book/03_reverse_process",
    "book/04_variational_bound",
]
# MyST roles/directives and labels that render on the built page only (raw on Colab), and the old placeholder.
RAW_MARKUP = re.compile(r"\{(cite|cite:t|cite:p|ref|func|note|admonition)\}|\(sec-[\w-]+\)=|part II", re.I)


def test_no_thebe_scripts(visit: Any, page: str) -> None:
    p = visit(page).page
    inline = p.evaluate("() => Array.from(document.scripts).map(s => (s.src || '') + ' ' + s.textContent)")
    assert not [s for s in inline if "THEBE_JS_URL" in s or "sphinx-thebe.js" in s], f"{page}: thebe scripts"


def test_favicon_loads(visit: Any, page: str) -> None:
    p = visit(page).page
    href = p.evaluate("() => { const l = document.querySelector('link[rel~=icon]'); return l && l.href; }")
    assert href, f"{page}: no <link rel=icon>"
    status = p.evaluate("async (u) => (await fetch(u)).status", href)
    assert status == 200, f"{page}: favicon {href} answered {status}"


def test_source_listings_do_not_wrap(visit: Any, page: str) -> None:
    p = visit(page).page
    modes = p.evaluate(
        "() => Array.from(document.querySelectorAll('.cell_output .output.text_html div.highlight pre'))"
        ".map(e => getComputedStyle(e).whiteSpace)"
    )
    assert all(m == "pre" for m in modes), f"{page}: source listings wrap ({set(modes)})"


@pytest.mark.parametrize("chapter", PART1)
def test_part1_has_no_raw_markup(visit: Any, chapter: str) -> None:
    text = visit(chapter).page.locator("article").inner_text()
    found = [text[max(m.start() - 40, 0) : m.end() + 40] for m in RAW_MARKUP.finditer(text)]
    assert found == [], f"{chapter}: MyST-only markup or 'part II' in the text: {found}"


@pytest.mark.parametrize("chapter", PART1)
def test_part1_solutions_are_details(visit: Any, chapter: str) -> None:
    p = visit(chapter).page
    n = p.locator("article details > summary").count()
    assert n >= 2, f"{chapter}: {n} collapsible solutions"
    assert p.evaluate("() => Array.from(document.querySelectorAll('article details')).every(d => !d.open)")


@pytest.mark.parametrize("chapter", PART1)
def test_part1_loads_no_widget_manager(visit: Any, chapter: str) -> None:
    v = visit(chapter)
    scripts = v.page.evaluate("() => Array.from(document.scripts).map(s => s.src)")
    manager = [s for s in scripts if "embed-amd" in s or "html-manager" in s]
    assert manager == [], f"{chapter}: widget manager loaded"
    assert v.http_errors == [], f"{chapter}: failed requests {v.http_errors}"


@pytest.mark.parametrize("chapter", PART1)
def test_part1_figures_fit_a_phone(book_url: str, chromium_browser: Any, chapter: str) -> None:
    """At 390 px, a plot (aspect <= 2.5) is shown at >= half its natural width, so its text stays legible.

    Very wide strips of small pictures (aspect > 2.5, e.g. one digit at eight timesteps) are exempt: their
    tiles stay visible when scaled down.
    """
    context = chromium_browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    try:
        page = context.new_page()
        page.route(
            "**/*", lambda r: r.continue_() if r.request.url.startswith((book_url, "data:")) else r.abort()
        )
        page.goto(f"{book_url}{chapter}.html", wait_until="load")
        page.evaluate("() => Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")
        sizes = page.evaluate(
            "() => Array.from(document.querySelectorAll('.cell_output img[src*=\"_images/\"]'))"
            ".map(i => [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width,"
            " i.src.split('/').pop()])"
        )
        assert sizes, f"{chapter}: no figures"
        too_small = [
            (name, nw, round(w / nw, 2))
            for nw, nh, w, name in sizes
            if nw > 0 and nw / nh <= 2.5 and w / nw < 0.5
        ]
        assert too_small == [], f"{chapter}: plots shrunk below half size at 390 px: {too_small}"
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{chapter}: the page scrolls sideways by {overflow} px at 390 px"
    finally:
        context.close()
