"""Full-page screenshots of every page of the built book, in headless chromium, fully offline.

Usage (after `make book-fast`):

    .venv/bin/python scripts/screenshots.py [--html _build/html] [--out _build/screenshots] [--width 1280]

Serves the built HTML on 127.0.0.1 (like the browser tests), blocks every other request, waits for MathJax and
the widgets, moves every scrubber half-way (so the picture shows a mid-process frame) and writes one PNG per
page of _toc.yml, e.g. `_build/screenshots/book_01_forward_process.png`. Prints the blocked requests, if any.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars"]  # fmt: skip


def toc_pages(toc: Path) -> list[str]:
    """Every page of _toc.yml, in order, without suffix."""
    data = yaml.safe_load(toc.read_text())
    pages = [data["root"]]

    def walk(entries: list[dict]) -> None:
        for e in entries:
            if "file" in e:
                pages.append(e["file"])
            for key in ("chapters", "sections", "parts"):
                walk(e.get(key, []))

    walk(data.get("chapters", []))
    walk(data.get("parts", []))
    return [re.sub(r"\.(md|ipynb)$", "", p) for p in pages]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's signature)
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--toc", type=Path, default=ROOT / "_toc.yml")
    ap.add_argument("--out", type=Path, default=ROOT / "_build" / "screenshots")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--scrub", type=float, default=0.5, help="move every scrubber to this fraction (0..1)")
    args = ap.parse_args(argv)
    if not (args.html / "index.html").exists():
        print(f"no built book at {args.html}; run `make book-fast` first", file=sys.stderr)
        return 2

    from playwright.sync_api import sync_playwright

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(args.html)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    args.out.mkdir(parents=True, exist_ok=True)
    blocked: list[str] = []

    def route(r) -> None:  # noqa: ANN001 (playwright Route)
        url = r.request.url
        if url.startswith(base) or url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            blocked.append(url)
            r.abort()

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 1200})
            page.route("**/*", route)
            for name in toc_pages(args.toc):
                page.goto(f"{base}{name}.html", wait_until="load")
                page.evaluate(
                    "() => (window.MathJax && MathJax.startup && MathJax.startup.promise)"
                    " ? MathJax.startup.promise.then(() => true) : true"
                )
                # Move each scrubber to a mid-process frame: set its value and fire `input`, as a drag does.
                page.evaluate(
                    """(frac) => document.querySelectorAll('div.iddpm-scrubber input[type=range]')
                    .forEach(r => {
                        r.value = Math.round(frac * Number(r.max));
                        r.dispatchEvent(new Event('input', {bubbles: true}));
                    })""",
                    args.scrub,
                )
                page.wait_for_timeout(500)
                path = args.out / f"{name.replace('/', '_')}.png"
                page.screenshot(path=str(path), full_page=True)
                print(f"{path}")
            browser.close()
    finally:
        server.shutdown()
    if blocked:
        print(f"blocked external requests: {sorted(set(blocked))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
