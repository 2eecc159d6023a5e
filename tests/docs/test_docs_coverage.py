"""The docs-commands test covers every page: each handwritten page (and the README) runs at
least one shell block, or is listed as reference-only and holds none; every block that does
not run says why; no shell block hides in an untagged fence, where the runner would not see it."""

from __future__ import annotations

import re

from tests.docs.pages import REFERENCE_ONLY, page_id, pages
from tests.docs.runner import FENCE, blocks

SHELL_LIKE = re.compile(r"^\s*(\$ )?(curl|meshserve|make|python|kubectl|docker|\.venv/bin/)\b", re.M)


def test_pages_are_found():
    ids = {page_id(p) for p in pages()}
    assert {"getting-started.md", "features/models-and-runtimes.md", "operations/security.md", "README.md"} <= ids
    assert not any(i.startswith("reference/") for i in ids)
    assert REFERENCE_ONLY <= ids, REFERENCE_ONLY - ids


def test_every_page_runs_commands_or_is_reference_only():
    for page in pages():
        found = blocks(page)
        run = [b for b in found if b.skipped is None]
        if page_id(page) in REFERENCE_ONLY:
            assert not found, f"{page_id(page)} is listed as reference-only but has shell blocks"
        else:
            assert run, f"{page_id(page)}: no shell block runs (add one, or list the page in REFERENCE_ONLY)"
        for block in found:
            assert block.skipped != "", f"{page_id(page)} line {block.line}: a skip marker without a reason"


def test_no_shell_block_hides_in_an_untagged_fence():
    for page in pages():
        lines = page.read_text().splitlines()
        inside, tag, body = False, "", []
        for n, line in enumerate(lines, 1):
            m = FENCE.match(line) if not inside else None
            if m:
                inside, tag, body, start = True, m.group(1), [], n
            elif inside and line.startswith("```"):
                assert tag or not SHELL_LIKE.search("\n".join(body)), (
                    f"{page_id(page)} line {start}: a fence without a language holds commands (tag it sh)"
                )
                inside = False
            elif inside:
                body.append(line)
