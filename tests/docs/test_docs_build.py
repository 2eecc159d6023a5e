"""The documentation site builds with every mkdocs warning an error (``make docs``), and its
generated reference pages follow the code: each setting with its environment variable and
flag, each CLI command, each REST route."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.server import REPO


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(REPO / "docs", root / "docs", ignore=shutil.ignore_patterns("reference"))
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    gen = subprocess.run([sys.executable, str(REPO / "docs" / "generate.py"), "--docs", str(root / "docs")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml")],
                           capture_output=True, text=True, timeout=120, cwd=root, env=env)  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    assert "WARNING" not in build.stderr, build.stderr
    return root


def test_every_page_is_built(site):
    built = site / "build" / "site"
    for page in ("getting-started", "concepts", "development", "features/models-and-runtimes", "operations/security",
                 "reference/settings", "reference/cli", "reference/api"):  # fmt: skip
        assert (built / page / "index.html").is_file(), page
    assert (built / "reference" / "openapi.json").is_file()


def test_settings_table_follows_the_settings_model(site):
    from meshserve.server.settings import Settings

    table = (site / "docs" / "reference" / "settings.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in table and f"`MESHSERVE_{name.upper()}`" in table, name
    # flags read from the parser: a renamed flag changes the page
    assert "| `--min-churn-age` |" in table and "| `--trace-probes` |" in table and "| `--insecure` |" in table


def test_cli_and_api_references_follow_the_code(site):
    cli = (site / "docs" / "reference" / "cli.md").read_text()
    for command in ("meshserve serve", "meshserve pull", "meshserve modelcar build", "meshserve generate"):
        assert f"`{command}`" in cli, command
    assert "--s3-endpoint" in cli and "--debug" in cli
    api = (site / "docs" / "reference" / "api.md").read_text()
    assert "`/v2/repository/models/{name}/load`" in api and "service GRPCInferenceService" in api
