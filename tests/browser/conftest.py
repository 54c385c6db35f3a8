"""Fixtures for the browser tests: serve the built book on 127.0.0.1 and drive Debian's chromium hermetically.

The book must already be built (``make book-fast``). Without the build or chromium these tests are skipped on
a developer machine, but FAIL when ``CI`` is set, so a broken build can never turn CI green.

Every request that does not go to the local server is aborted and recorded, which is how the tests prove the
book works offline (self-hosted require.js, widget manager and MathJax).

pytest-playwright must NOT be installed: its own ``browser``/``page`` fixtures would take over. The fixtures
here use distinct names anyway.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# IDDPM_BOOK_HTML points the tests at another build (e.g. one made with --path-output).
HTML_DIR = Path(os.environ.get("IDDPM_BOOK_HTML", ROOT / "_build" / "html"))
TOC = ROOT / "_toc.yml"
CHROMIUM = os.environ.get("IDDPM_CHROMIUM", "/usr/bin/chromium")
# The flags that made Debian's chromium run headless and quiet on CI machines (see BOOK-TOOLCHAIN.md §6).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

# Known, harmless console noise of JB 1.0.4 / sphinx-book-theme 1.3 / html-manager 1.0 (BOOK-TOOLCHAIN.md §6).
# Anything else on the console as an error fails the tests.
# (sphinx-thebe's doubled config script, "Identifier 'THEBE_JS_URL' has already been declared", is no longer
# allowed: _ext/iddpm_sphinx.py removes thebe's scripts from every page.)
ALLOWED_CONSOLE_ERRORS = [
    # pydata-sphinx-theme before localStorage has a theme mode.
    re.compile(r"Got invalid theme mode"),
    # html-manager resolves its FontAwesome font URLs relative to the page: cosmetic 404s (which URLs may 404
    # is checked separately, against ALLOWED_HTTP_ERRORS).
    re.compile(r"Failed to load resource: the server responded with a status of 404"),
    # html-manager typesets widget descriptions with MathJax 2's MathJax.Hub.Queue; Sphinx uses MathJax 3.
    # The widget still renders (checked on a test page with an IntSlider and a tqdm.auto bar, offline).
    re.compile(r"Cannot read properties of undefined \(reading 'Queue'\)"),
]
# Uncaught exceptions that are allowed: the MathJax 2 call of the widgets (it can surface as a page error).
ALLOWED_PAGE_ERRORS = [ALLOWED_CONSOLE_ERRORS[2]]
# Allowed local 404s: html-manager's FontAwesome fonts (hashed names, requested relative to the page).
ALLOWED_HTTP_ERRORS = [re.compile(r"/[0-9a-f]{20}\.(woff2?|ttf|eot|svg)(\?.*)?$")]


def _missing(reason: str) -> None:
    """Skip on a developer machine, fail in CI (where a skip would hide a broken build)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def _toc_files(entries: list[dict[str, Any]]) -> Iterator[str]:
    for entry in entries:
        if "file" in entry:
            yield entry["file"]
        for key in ("chapters", "sections", "parts"):
            yield from _toc_files(entry.get(key, []))


def toc_pages() -> list[str]:
    """Every page in _toc.yml order, as paths without suffix (e.g. ``book/01_forward_process``)."""
    import yaml

    toc = yaml.safe_load(TOC.read_text())
    pages = [toc["root"], *_toc_files(toc.get("chapters", [])), *_toc_files(toc.get("parts", []))]
    return [re.sub(r"\.(md|ipynb)$", "", p) for p in pages]


def is_notebook(page: str) -> bool:
    return (ROOT / f"{page}.ipynb").exists()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``page`` over every page of _toc.yml and ``notebook`` over the notebook chapters."""
    if "page" in metafunc.fixturenames:
        metafunc.parametrize("page", toc_pages())
    if "notebook" in metafunc.fixturenames:
        metafunc.parametrize("notebook", [p for p in toc_pages() if is_notebook(p)])


@pytest.fixture(scope="session")
def root_page() -> str:
    """The book's first page (``root`` in _toc.yml)."""
    return toc_pages()[0]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        pass


@pytest.fixture(scope="session")
def book_url() -> Iterator[str]:
    """Base URL of ``_build/html`` served by a ThreadingHTTPServer on 127.0.0.1 (a free port)."""
    if not (HTML_DIR / "index.html").exists():
        _missing(f"the book is not built: {HTML_DIR / 'index.html'} is missing; run `make book-fast`")
    handler = functools.partial(_QuietHandler, directory=str(HTML_DIR))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def chromium_browser() -> Iterator[Any]:
    """Playwright driving the system chromium (Playwright's own browser download can't work offline)."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        _missing(f"chromium not found at {CHROMIUM}; run `make browser-deps`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Visit:
    """One loaded page and everything that went wrong while loading it."""

    page: Any  # playwright.sync_api.Page
    url: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    http_errors: list[str] = field(default_factory=list)

    def unexpected_errors(self) -> list[str]:
        errors = [e for e in self.console_errors if not any(p.search(e) for p in ALLOWED_CONSOLE_ERRORS)]
        errors += [e for e in self.page_errors if not any(p.search(e) for p in ALLOWED_PAGE_ERRORS)]
        errors += [e for e in self.http_errors if not any(p.search(e) for p in ALLOWED_HTTP_ERRORS)]
        return errors


@pytest.fixture(scope="session")
def visit(book_url: str, chromium_browser: Any) -> Iterator[Any]:
    """``visit(page)`` loads a page of the book once per session (cached) and returns its :class:`Visit`."""
    context = chromium_browser.new_context(viewport={"width": 1280, "height": 1600})
    visits: dict[str, Visit] = {}

    def load(page_path: str) -> Visit:
        if page_path in visits:
            return visits[page_path]
        page = context.new_page()
        v = Visit(page=page, url=f"{book_url}{page_path}.html")

        def route(r: Any) -> None:
            url = r.request.url
            if url.startswith(book_url) or url.startswith(("data:", "blob:")):
                r.continue_()
            else:
                v.external_requests.append(url)
                r.abort()

        page.route("**/*", route)
        page.on("console", lambda m: v.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: v.page_errors.append(str(e)))
        page.on("response", lambda r: v.http_errors.append(f"{r.status} {r.url}") if r.status >= 400 else 0)
        response = page.goto(v.url, wait_until="load")
        assert response is not None and response.ok, f"{v.url} answered {response and response.status}"
        # Wait for MathJax 3 to finish typesetting (it is only on pages with math).
        page.evaluate(
            "() => (window.MathJax && MathJax.startup && MathJax.startup.promise)"
            " ? MathJax.startup.promise.then(() => true) : true"
        )
        # Pages that display widgets: give require.js + the widget manager time to render them. (A page can
        # embed widget state without displaying any widget, e.g. when the live cell is tagged remove-output.)
        if page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count():
            page.wait_for_selector(".jupyter-widgets", timeout=15_000)
        visits[page_path] = v
        return v

    yield load
    context.close()
