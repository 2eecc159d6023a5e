"""Every shell block of the documentation pages runs, as a reader would paste it, against
real servers (tests/docs/runner.py): a documented flag, field or output that drifts fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.runner import blocks, run_page, script
from tests.support.server import REPO, ensure_iris

PAGES = sorted((REPO / "docs").glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_commands_run(page: Path, tmp_path):
    ensure_iris()
    if not (REPO / "examples" / "models" / "llama2" / "config.json").exists():
        pytest.skip("examples/models/llama2 is not built (make examples)")
    result = run_page(page, tmp_path / "page")
    print(f"{page.name}: {result.seconds:.1f}s")
    assert result.returncode == 0, f"{page.name} failed:\n{result.output[-6000:]}"


def test_runner_checks_outputs_and_fails_on_drift(tmp_path):
    """The runner itself: a `# =>` expectation that does not hold fails the page, one that holds
    passes, a skipped block does not run, and documented ports become free ones."""
    good = tmp_path / "good.md"
    good.write_text(
        "text\n```sh\necho hello world\n# => hello\n```\n"
        "<!-- docs-test: skip needs Docker -->\n```sh\nexit 3\n```\n"
        "```bash\necho port localhost:8080\n```\n"
    )
    assert [b.skipped for b in blocks(good)] == [None, "needs Docker", None]
    assert "localhost:8080" not in script(good, {})
    assert run_page(good, tmp_path / "g").returncode == 0
    drifted = tmp_path / "drifted.md"
    drifted.write_text("```sh\necho hello world\n# => goodbye\n```\n")
    result = run_page(drifted, tmp_path / "d")
    assert result.returncode != 0 and "expected 'goodbye'" in result.output
