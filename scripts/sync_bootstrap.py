"""Rewrite the Colab set-up cell (the first cell) of every chapter from ONE template.

Usage, from the repository root:

    python scripts/sync_bootstrap.py          # rewrite book/*.ipynb in place
    python scripts/sync_bootstrap.py --check  # exit 1 (listing the chapters) if any cell is not canonical

The repository URL and branch come from `_config.yml` (`repository.url`, `repository.branch`), the one place
they live: the Colab launch buttons use them too. To point the book at another repository (a public fork),
edit `repository.url` there and run this script. `tests/test_book_sources.py` checks that every chapter's cell
is the rendered template and that the README names the same URL.

On Colab the cell clones the repository (shallow, the book's branch) and installs it with `pip install -e`
(once per runtime: a marker file in the clone lets a re-run skip the install), so the chapters can import
`iddpm` and read the committed `results/` (`IDDPM_RESULTS` points at the clone's).
If the clone, the install or the import fails, the cell raises a RuntimeError that says what failed and why,
instead of a ModuleNotFoundError several cells later. Elsewhere it only selects inline figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "_config.yml"
BOOK = ROOT / "book"
TAGS = ["remove-cell"]  # hidden in the book; Colab shows the cell's @title form, collapsed
MARKER = "google.colab"  # how an existing set-up cell is recognised

TEMPLATE = """\
# @title Setup (on Colab: installs iddpm from the book's repository; elsewhere: nothing to do)
# Written by scripts/sync_bootstrap.py from _config.yml: edit the template there, not this cell.
REPO_URL = "{url}"
BRANCH = "{branch}"
try:
    import google.colab  # noqa: F401

    IN_COLAB = True
except ImportError:
    IN_COLAB = False
if IN_COLAB:
    import importlib
    import os
    import subprocess
    import sys

    CLONE = "/content/iddpm"

    def _run(cmd, what):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            log = (r.stdout + r.stderr)[-3000:]
            raise RuntimeError(f"Colab set-up failed: {{what}} (exit {{r.returncode}}).\\n{{log}}")

    if not os.path.isdir(os.path.join(CLONE, "iddpm")):
        _run(
            ["git", "clone", "--quiet", "--depth", "1", "--branch", BRANCH, REPO_URL, CLONE],
            f"could not clone {{REPO_URL}} (branch {{BRANCH}}); is it public and is _config.yml's URL right?",
        )
    installed = os.path.join(CLONE, ".iddpm-installed")  # written after a good install: a re-run skips pip
    if not os.path.exists(installed):
        pip = [sys.executable, "-m", "pip", "install", "-q", "-e", CLONE + "[viz,data]"]
        _run(pip, "pip install -e failed")
        open(installed, "w").close()
    sys.path.insert(0, CLONE)  # the editable install reaches sys.path only after a restart: import the clone
    os.environ["IDDPM_RESULTS"] = os.path.join(CLONE, "results")  # the committed results the chapters read
    try:
        importlib.import_module("iddpm")
    except Exception as err:
        raise RuntimeError(f"Colab set-up failed: iddpm is installed but does not import: {{err!r}}") from err
# Inline figures even when MPLBACKEND=agg is set in the environment (it would silently drop every figure).
%matplotlib inline"""


def repository() -> tuple[str, str]:
    """(url, branch) from _config.yml's `repository` section."""
    repo = yaml.safe_load(CONFIG.read_text())["repository"]
    return str(repo["url"]).rstrip("/"), str(repo.get("branch", "main"))


def render() -> str:
    """The canonical set-up cell's source."""
    url, branch = repository()
    return TEMPLATE.format(url=url, branch=branch)


def chapters() -> list[Path]:
    return sorted(BOOK.glob("*.ipynb"))


def is_setup_cell(cell: dict) -> bool:
    return cell.get("cell_type") == "code" and MARKER in "".join(cell.get("source", ""))


def sync(path: Path, check: bool = False) -> bool:
    """Make the first cell of `path` the canonical set-up cell (inserted if missing). True if changed."""
    nb = nbformat.read(path, as_version=4)
    source = render()
    first = nb.cells[0] if nb.cells else None
    if first is not None and is_setup_cell(first):
        ok = first.source == source and first.metadata.get("tags") == TAGS
        if ok or check:
            return not ok
        first.source = source
        first.metadata["tags"] = list(TAGS)
    else:
        if check:
            return True
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": list(TAGS)})
        cell.id = "setup"
        nb.cells.insert(0, cell)
    nbformat.write(nb, path)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a chapter is not in sync")
    args = ap.parse_args(argv)
    changed = [p.relative_to(ROOT) for p in chapters() if sync(p, check=args.check)]
    url, branch = repository()
    verb = "out of sync" if args.check else "rewritten"
    print(f"set-up cell: {url} @ {branch}; {len(changed)} chapter(s) {verb}: {', '.join(map(str, changed))}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
