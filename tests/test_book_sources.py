"""Checks of the book's sources (no build, no execution): the repository URL lives in ONE place.

`_config.yml`'s `repository.url` drives the Colab launch buttons; the set-up cell of every chapter (every
`book/*.ipynb`, including chapters added later) must be the template of `scripts/sync_bootstrap.py` rendered
with that URL and branch, and the README must name the same URL. After changing the URL, run
`python scripts/sync_bootstrap.py`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_bootstrap", ROOT / "scripts" / "sync_bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


SYNC = _sync_module()


def test_config_has_one_repository_url() -> None:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = config["repository"]["url"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    assert SYNC.repository() == (url.rstrip("/"), config["repository"]["branch"])
    assert "launch_buttons" in config and config["launch_buttons"]["colab_url"]


def test_there_are_chapters() -> None:
    assert len(CHAPTERS) >= 4


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_setup_cell_is_canonical(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    url, branch = SYNC.repository()
    assert SYNC.is_setup_cell(first), f"{path.name}: cell 0 is not the set-up cell"
    assert f'REPO_URL = "{url}"' in first.source and f'BRANCH = "{branch}"' in first.source
    assert first.source == SYNC.render(), f"{path.name}: run `python scripts/sync_bootstrap.py`"
    assert first.metadata.get("tags") == SYNC.TAGS, f"{path.name}: the set-up cell must be tagged remove-cell"
    others = [i for i, c in enumerate(nb.cells[1:], 1) if c.cell_type == "code" and SYNC.is_setup_cell(c)]
    assert others == [], f"{path.name}: a second set-up cell at {others}"


def test_no_other_repository_url_in_chapters() -> None:
    """No chapter hard-codes a github.com/OWNER/REPO URL other than the configured one."""
    url, _ = SYNC.repository()
    for path in CHAPTERS:
        for cell in nbformat.read(path, as_version=4).cells:
            for found in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", cell.source):
                assert found == url, f"{path.name} names {found}, but _config.yml says {url}"


def test_readme_names_the_configured_url() -> None:
    url, _ = SYNC.repository()
    readme = (ROOT / "README.md").read_text()
    assert url in readme, f"README.md does not name the repository URL of _config.yml ({url})"
    others = {u for u in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", readme) if u != url}
    owner_repo = "/".join(url.split("/")[-2:])
    assert not [u for u in others if u.split("/")[-1] == owner_repo.split("/")[-1]], others
    assert "sync_bootstrap.py" in readme, "README.md must say how to point the book at another repository"


def test_sync_check_passes() -> None:
    assert SYNC.main(["--check"]) == 0
