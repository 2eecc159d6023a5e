"""The documentation pages whose commands CI runs: every handwritten page under docs/
(the generated reference pages hold no commands) and README.md."""

from __future__ import annotations

from pathlib import Path

from tests.support.server import REPO

DOCS = REPO / "docs"
# Pages that explain and hold no commands to run (their shell blocks would be listed here).
REFERENCE_ONLY = {"index.md", "concepts.md", "operations/performance.md"}


def pages() -> list[Path]:
    """Every handwritten page, then the README; generated reference pages are not pages here."""
    found = [p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] != "reference"]
    return sorted(found) + [REPO / "README.md"]


def page_id(page: Path) -> str:
    return "README.md" if page == REPO / "README.md" else page.relative_to(DOCS).as_posix()
