"""Every shell block of the documentation pages runs, as a reader would paste it, against
real servers (tests/docs/runner.py): a documented flag, field or output that drifts fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.pages import page_id, pages
from tests.docs.runner import blocks, run_page, script
from tests.support.server import REPO, ensure_iris

pytestmark = pytest.mark.system  # each page's commands run in bash against real servers

PAGES = pages()


@pytest.mark.parametrize("page", PAGES, ids=[page_id(p) for p in PAGES])
def test_page_commands_run(page: Path, tmp_path):
    if not any(b.skipped is None for b in blocks(page)):
        pytest.skip("no commands to run (tests/docs/test_docs_coverage.py says which pages may)")
    ensure_iris()
    if not (REPO / "examples" / "models" / "llama2" / "config.json").exists():
        pytest.skip("examples/models/llama2 is not built (make examples)")
    result = run_page(page, tmp_path / "page")
    print(f"{page_id(page)}: {result.seconds:.1f}s")
    assert result.returncode == 0, f"{page_id(page)} failed:\n{result.output[-6000:]}"


def test_runner_checks_outputs_and_fails_on_drift(tmp_path):
    """The runner itself: a `# =>` expectation that does not hold fails the page, one that holds
    passes (after a here-document too), a skipped block does not run, a hidden block does, and
    documented ports become free ones."""
    good = tmp_path / "good.md"
    good.write_text(
        "text\n```sh\necho hello world\n# => hello\n```\n"
        "<!-- docs-test: skip needs Docker -->\n```sh\nexit 3\n```\n"
        "<!-- docs-test: run\necho hidden > hidden.txt\n-->\n"
        "```bash\necho port localhost:8080\ngrep -q hidden hidden.txt\n```\n"
        "```sh\npython - <<'PY'\nprint(\"it's \" + 'here')\nPY\n# => it's here\n```\n"
    )
    assert [b.skipped for b in blocks(good)] == [None, "needs Docker", None, None, None]
    assert "localhost:8080" not in script(good, {})
    assert run_page(good, tmp_path / "g").returncode == 0
    drifted = tmp_path / "drifted.md"
    drifted.write_text("```sh\necho hello world\n# => goodbye\n```\n")
    result = run_page(drifted, tmp_path / "d")
    assert result.returncode != 0 and "expected 'goodbye'" in result.output
