"""The paper map (book/paper_map.md) cannot rot: every package function it names exists, and every file,
chapter and result it links to is in the repository.

The map links package code and results as GitHub URLs of the repository in ``_config.yml`` (so they work on
GitHub, in the built book and on Colab alike) and chapters as relative ``NN_name.ipynb`` links (which the book
turns into links to the built pages).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "book" / "paper_map.md"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
BLOB = f"{CONFIG['repository']['url'].rstrip('/')}/blob/{CONFIG['repository']['branch']}/"

TEXT = MAP.read_text()
LINKS = re.findall(r"\[([^\]]+)\]\(([^)\s]+)\)", TEXT)  # (text, target)
CODE_LINKS = [(t.strip("`"), url) for t, url in LINKS if t.startswith("`")]
CHAPTER_LINKS = sorted({url for _, url in LINKS if not url.startswith(("http://", "https://"))})
REPO_LINKS = sorted({url for _, url in LINKS if url.startswith(BLOB)})


def test_map_has_tables_and_links():
    assert TEXT.startswith("# The paper, mapped")
    assert TEXT.count("| paper | chapter | package | result |") >= 4
    assert len(CODE_LINKS) >= 30 and len(CHAPTER_LINKS) >= 9 and len(REPO_LINKS) >= 15


def test_no_myst_only_markup():
    # roles and directives show raw on GitHub and Colab
    assert not re.search(r"\{(cite|ref|func|doc|numref|glue)[:}]", TEXT)
    assert "```{" not in TEXT and ":::" not in TEXT


def test_only_confirmed_equation_numbers():
    assert set(re.findall(r"Eq\.\s*(\d+)", TEXT)) <= {"15", "16"}


def test_links_to_github_use_the_configured_repository():
    github = [url for _, url in LINKS if "github.com" in url]
    bad = [url for url in github if not url.startswith(BLOB)]
    assert bad == [], f"links not under {BLOB}: {bad}"


@pytest.mark.parametrize("url", REPO_LINKS)
def test_linked_repository_file_exists(url):
    path = url[len(BLOB) :].split("#")[0]
    assert (ROOT / path).is_file(), f"{url} links to {path}, which is not in the repository"


@pytest.mark.parametrize("target", CHAPTER_LINKS)
def test_linked_chapter_exists_and_is_in_the_toc(target):
    path = target.split("#")[0]
    assert (ROOT / "book" / path).is_file(), f"the map links to book/{path}, which does not exist"
    toc = (ROOT / "_toc.yml").read_text()
    assert f"book/{Path(path).with_suffix('')}" in toc, f"book/{path} is not in _toc.yml"


@pytest.mark.parametrize(("name", "url"), CODE_LINKS, ids=[n for n, _ in CODE_LINKS])
def test_named_package_function_exists_in_the_linked_file(name, url):
    module_name, *attrs = name.split(".")
    module = importlib.import_module(f"iddpm.{module_name}")
    obj = module
    for attr in attrs:
        assert hasattr(obj, attr), f"iddpm.{name} does not exist"
        obj = getattr(obj, attr)
    source = Path(module.__file__).resolve().relative_to(ROOT).as_posix()
    assert url == BLOB + source, f"`{name}` links to {url}, but lives in {source}"
