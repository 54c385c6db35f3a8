"""The book's own Sphinx tweaks (loaded through ``sphinx.local_extensions`` in ``_config.yml``).

sphinx-thebe (which Jupyter Book 1.x always loads) registers its inline config script in an
``env-before-read-docs`` handler with ``app.add_js_file(None, body=...)``. Sphinx 7 records that script both
in the registry and in the HTML builder, and inline scripts (no file name) are never de-duplicated: every page
got ``const THEBE_JS_URL = ...`` twice and the browser reported "Identifier 'THEBE_JS_URL' has already been
declared". The book does not use thebe (Colab is its launch button), so this extension drops sphinx-thebe's
scripts from every page and removes any other exact duplicate script as well.
"""

from __future__ import annotations

from typing import Any

THEBE_MARKERS = ("THEBE_JS_URL", "sphinx-thebe.js")


def _is_thebe(js: Any) -> bool:
    text = f"{getattr(js, 'filename', js)} {getattr(js, 'attributes', {}).get('body', '')}"
    return any(marker in text for marker in THEBE_MARKERS)


def _clean_scripts(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    kept = []
    for js in scripts:
        if _is_thebe(js):
            continue
        key = (str(getattr(js, "filename", js)), tuple(sorted(getattr(js, "attributes", {}).items())))
        if key in seen:
            continue
        seen.add(key)
        kept.append(js)
    context["script_files"] = kept


def setup(app: Any) -> dict[str, Any]:
    app.connect("html-page-context", _clean_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
