"""The book's prose types no measured numbers: they are printed by the cells, or read from results/.

A number typed into a Markdown cell silently goes stale when the code, the schedule or the results change
(and FAST and full mode print different ones). The prose says what the printed numbers show (orders of
magnitude, "under a fifth", "several times") and the cell that prints them asserts it. This test flags
decimals with two or more digits after the point, and scientific mantissas, in every chapter's Markdown
(code blocks, inline code and link targets excluded); the few constants of the method itself are allowed.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = sorted(BOOK.glob("*.ipynb"))
PAGES = sorted(BOOK.glob("*.md"))

# Constants of the method and of the recipes, not measurements: EMA rates, the cosine offset s, the linear
# schedule's end points, the beta clip, and the hybrid loss's lambda.
# The paper's two confirmed likelihoods (shared reference: paper-numbers.md) may be quoted as the paper's.
ALLOWED = {"0.999", "0.9999", "0.008", "0.02", "0.01", "0.001", "0.0001"} | {"2.94", "3.53"}
ARXIV_ID = re.compile(r"\b\d{4}\.\d{4,5}\b")

FENCE = re.compile(r"```.*?```", re.S)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
HTML_TAG = re.compile(r"<[^>]+>")
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d{2,}(?![\w.])")
MANTISSA = re.compile(r"\d\.\d+\s*\\times\s*10")


def prose(text: str) -> str:
    for pattern in (FENCE, INLINE_CODE, LINK_TARGET, HTML_TAG, ARXIV_ID):
        text = pattern.sub(" ", text)
    return text


def typed_numbers(text: str) -> list[str]:
    text = prose(text)
    found = [m.group(0) for m in DECIMAL.finditer(text) if m.group(0) not in ALLOWED]
    return found + [m.group(0) for m in MANTISSA.finditer(text)]


def test_the_scan_finds_typed_numbers() -> None:
    assert typed_numbers("the bound is 4.213 bits/dim and $2.9\\times10^{-5}$") == ["4.213", "2.9\\times10"]
    assert typed_numbers("EMA 0.9999, `x = 3.14159`, [a](https://x.org/1.234), $2\\times10^{-4}$, 1.5") == []
    assert typed_numbers("arXiv:2102.09672 reports 2.94 bits/dim") == []


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_measured_number_is_typed_into_prose(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    markdown = [(i, cell.source) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"]
    bad = [(i, n) for i, text in markdown for n in typed_numbers(text)]
    assert not bad, (
        f"{path.name}: numbers typed into Markdown (cell index, number): {bad}. Print them from a cell, "
        "or say what they show (an order of magnitude, a ratio) and assert that in the cell that prints them."
    )


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_no_measured_number_is_typed_into_a_page(path: Path) -> None:
    bad = typed_numbers(path.read_text())
    assert not bad, f"{path.name}: numbers typed into the page: {bad}"
