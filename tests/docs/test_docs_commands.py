"""Every shell block of the documentation pages runs, as a reader would paste it, against
real servers (tests/docs/runner.py): a documented flag, field or output that drifts fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.runner import blocks, run_page, script
from tests.support.server import REPO, ensure_iris

pytestmark = pytest.mark.system  # each page's commands run in bash against real servers

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


def readme_section(heading: str, target: Path) -> Path:
    """One ``## heading`` section of the README (up to the next ``## ``), as a page of its own."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    target.write_text(text[start : end if end != -1 else None])
    return target


def test_readme_runtimes_section_runs(tmp_path):
    """The README's runtimes examples: torch, ONNX, XGBoost and transformers models created in
    `models/` (the later ones while the server runs, then loaded by name) answer as shown."""
    for module in ("torch", "onnxruntime", "onnx", "xgboost", "transformers"):
        pytest.importorskip(module)
    page = readme_section("Models and runtimes", tmp_path / "runtimes.md")
    result = run_page(page, tmp_path / "page")
    print(f"README runtimes: {result.seconds:.1f}s")
    assert result.returncode == 0, f"README 'Models and runtimes' failed:\n{result.output[-6000:]}"


def test_readme_modelcar_section_runs(tmp_path):
    """The README's modelcar commands: a registry on loopback, build and push, pull back."""
    if not Path("/usr/bin/docker-registry").exists():
        pytest.skip("docker-registry is not installed (make system-deps)")
    ensure_iris()
    page = readme_section("Model URIs, modelcars and the cache", tmp_path / "uris.md")
    result = run_page(page, tmp_path / "page")
    print(f"README modelcars: {result.seconds:.1f}s")
    assert result.returncode == 0, f"README 'Model URIs, modelcars and the cache' failed:\n{result.output[-6000:]}"
