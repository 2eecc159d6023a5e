"""Run a documentation page's shell blocks as one script, the way a reader pastes them.

A page's ```sh / ```bash blocks run in order, in one bash process (``set -euo pipefail``),
in a temporary folder that sees the repository's ``examples/`` and ``.venv`` (read-only use)
and has the venv's ``bin`` first on PATH (what ``. .venv/bin/activate`` does). Rewritten on
the way: the documented ports (8080-8099 REST/gRPC, 9080-9099 adapters, 5000 registry, 2379 etcd) become free
ones, and ``meshserve serve`` binds 127.0.0.1. ``curl`` fails on an HTTP error and gives up
after two minutes, so a documented request that drifts fails the page.

Markers (HTML comments, invisible on the rendered page):

- ``<!-- docs-test: skip REASON -->`` before a block: not run (needs Docker, a cluster, a GPU,
  or is the installation the test already stands in).
- a comment line ``# => TEXT`` after a command in a block: that command's output must hold TEXT.
- ``<!-- docs-test: run`` on a line of its own, commands, then ``-->``: a block the page does not
  show but the test runs there, standing in for a skipped one (the README's ``make serve``).

Everything the page starts in the background is in the script's process group, killed when
the page ends, pass or fail."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.server import REPO, free_port

FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->")
HIDDEN = re.compile(r"^<!--\s*docs-test:\s*run\s*$")
EXPECT = re.compile(r"^\s*# => (.+?)\s*$")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
# The ports the docs use (REST/gRPC 8080-8099, adapters 9080-9099, a registry on 5000, etcd on 2379/2380).
DOC_PORTS = re.compile(r"(?<=[:\s])(80[89]\d|90[89]\d|5000|2379|2380)\b")


@dataclass
class Block:
    line: int  # where it starts in the page (1-based)
    text: str
    skipped: str | None  # the reason, when marked ("" when the marker gives none)


def blocks(page: Path) -> list[Block]:
    """The page's shell blocks, in order, with their skip markers."""
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    pending_skip: str | None = None
    while i < len(lines):
        if HIDDEN.match(lines[i]):
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "-->":
                body.append(lines[i])
                i += 1
            out.append(Block(start + 1, "\n".join(body), None))
            i += 1
            continue
        m = SKIP.search(lines[i])
        if m:
            pending_skip = m.group(1).strip()  # "" (no reason given) fails the page's coverage test
        fence = FENCE.match(lines[i])
        if fence:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if fence.group(1) in ("sh", "bash", "shell"):
                out.append(Block(start, "\n".join(body), pending_skip))
            pending_skip = None
        elif lines[i].strip() and not m:
            pending_skip = pending_skip if lines[i].lstrip().startswith("<!--") else None
        i += 1
    return out


def _checked(block: Block) -> str:
    """``# => TEXT`` lines as checks on the command before them (one line, ``\\``-continued, or
    a here-document)."""
    out: list[str] = []
    command: list[str] = []
    for raw in block.text.splitlines():
        expect = EXPECT.match(raw)
        if expect and command:
            cmd = "\n".join(command)
            want = expect.group(1)
            out[-len(command) :] = [
                f'{{ {cmd}\n}} > "$DOCS_OUT" 2>&1 || {{ cat "$DOCS_OUT"; exit 1; }}',
                'cat "$DOCS_OUT"; echo',
                f'grep -qF -- {shlex.quote(want)} "$DOCS_OUT" || '
                f"{{ echo {shlex.quote(f'docs-test: page line {block.line}: expected {want!r} in the output of: {cmd}')} >&2; exit 1; }}",  # noqa: E501
            ]
            command = []
            continue
        out.append(raw)
        if command and not _complete("\n".join(command)):
            command.append(raw)
        else:
            command = [raw] if raw.strip() and not raw.lstrip().startswith("#") else []
    return "\n".join(out)


def _complete(command: str) -> bool:
    """A whole shell command: no trailing ``\\``, every quote closed, a here-document ended."""
    lines = command.splitlines()
    heredoc = HEREDOC.search(lines[0])
    if heredoc:
        return len(lines) > 1 and lines[-1].strip() == heredoc.group(1)
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command, comments=True)
    except ValueError:
        return False
    return True


def script(page: Path, ports: dict[str, int]) -> str:
    parts = [
        "set -euo pipefail",
        'DOCS_OUT="$(mktemp)"',
        # curl as the docs use it, but failing on an HTTP error and never hanging.
        # A command that prints the status itself (-w '%{http_code}') shows an error on purpose.
        'curl() { case " $* " in *" -f "* | *" -sf "* | *" -fs "* | *" --fail "* | *" -w "* | *" --write-out "*)'
        ' command curl --max-time 120 "$@" ;;'
        ' *) command curl --fail-with-body --max-time 120 "$@" ;; esac; }',
    ]
    for block in blocks(page):
        if block.skipped is not None:
            parts.append(f"# page line {block.line}: skipped ({block.skipped})")
            continue
        parts.append(f'echo; echo "--- page line {block.line} (at $SECONDS s)"')
        parts.append(_checked(block))
    parts.append('echo; echo "--- page end (at $SECONDS s)"')
    text = "\n".join(parts) + "\n"
    text = re.sub(r"\bmeshserve serve\b((?:[^\n]*\\\n)*[^\n]*)", _serve_on_loopback, text)
    return DOC_PORTS.sub(lambda m: str(ports.setdefault(m.group(1), free_port())), text)


def _serve_on_loopback(m: re.Match) -> str:
    """``meshserve serve`` on 127.0.0.1, its default ports spelt out (then mapped like the rest)."""
    rest = m.group(1)
    defaults = "" if "--http-port" in rest else " --http-port 8080"
    defaults += "" if "--grpc-port" in rest else " --grpc-port 8081"
    return f"meshserve serve --host 127.0.0.1{defaults}{rest}"


@dataclass
class PageRun:
    returncode: int
    output: str
    seconds: float


def run_page(page: Path, workdir: Path, timeout: float = 110) -> PageRun:
    """Run the page in ``workdir``; every process it started is gone when this returns."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("examples", "protocol", "deploy", "Dockerfile", "Makefile", "pyproject.toml"):
        (workdir / name).symlink_to(REPO / name)
    venv = Path(sys.prefix)
    (workdir / ".venv").symlink_to(venv)
    (workdir / "page.sh").write_text(script(page, {}))
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "HOME": str(workdir / "home"),  # no docker config, no caches of the user's own
        "XDG_CACHE_HOME": str(workdir / "cache"),
        "PYTHONPATH": str(REPO),
    }
    log = workdir / "page.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "page.sh"], cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            _kill_group(proc.pid)
    text = log.read_text(errors="replace")
    if code == -1:
        text += f"\ndocs-test: the page did not finish in {timeout:.0f}s"
    return PageRun(code, text, time.monotonic() - started)


def _kill_group(pgid: int) -> None:
    """SIGTERM the page's processes (servers drain), then SIGKILL what is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
