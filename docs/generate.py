"""Write the documentation pages that come from the code, so they cannot drift from it
(``make docs`` runs this, then ``mkdocs build --strict``):

- ``reference/settings.md``: every field of ``Settings`` with its type, default, environment
  variable, config key and ``serve`` flag (read from ``serve_overrides``, the one place flags
  become settings), described by the comments beside the field in server/settings.py;
- ``reference/cli.md``: every ``meshserve`` command's ``--help``, from the argparse parser;
- ``reference/api.md`` with ``openapi.json``: the REST routes of the OpenAPI document, and the proto.

The other pages are written by hand (their commands run in CI: tests/docs).

    python docs/generate.py   # writes under docs/reference (git-ignored)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent


# -- settings -------------------------------------------------------------------------
def _comments(source: str) -> dict[str, str]:
    """The comment above or beside each ``name: type = ...`` line of the Settings class."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"^    (\w+): [^=]+(?:=.*?)?(?:#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "@", "return")):
            out[m.group(1)] = " ".join([*above, m.group(2) or ""]).strip()
        above = [] if not stripped.startswith("#") else above
    return out


def _flags_by_setting() -> dict[str, str]:
    """Setting field -> the ``serve`` flag that sets it, from the parser and serve_overrides."""
    from meshserve.server.cli import _parser, serve_overrides

    serve = _subparsers(_parser())["serve"]
    flag_of = {a.dest: max(a.option_strings, key=len) for a in serve._actions if a.option_strings}
    probe = argparse.Namespace(**{dest: f"@{dest}" for dest in flag_of})
    out: dict[str, str] = {}
    for field, value in serve_overrides(probe).items():
        value = value[0] if isinstance(value, list) else value  # cors_origins is split
        if isinstance(value, str) and value.startswith("@"):
            out[field] = flag_of[value.lstrip("@").split(",")[0]]
    return out


def _cell(value: Any) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if text else ""


def settings_page() -> str:
    from meshserve.server.settings import Settings

    comments = _comments((REPO / "server" / "settings.py").read_text().split("class Settings", 1)[1])
    flags = _flags_by_setting()
    rows = [
        "| setting (config key) | type | default | environment | flag | what |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        annotation = str(field.annotation).replace("typing.", "").replace("pathlib.", "").replace("<class '", "")
        annotation = annotation.replace("'>", "")
        default = "" if field.is_required() else field.get_default(call_default_factory=True)
        if name in ("predict_threads",):
            default = "min(32, CPUs + 4)"  # computed on the machine that builds the docs
        env = f"MESHSERVE_{name.upper()}"
        flag = flags.get(name, "")
        what = comments.get(name, "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_cell(annotation)} | {_cell(default)} | `{env}` | {_cell(flag)} | {what} |")
    return (
        "# Settings\n\n"
        "Generated from `Settings` (server/settings.py) and the `serve` parser by `docs/generate.py`.\n"
        "Precedence: flags, then `MESHSERVE_*` environment variables, then the config file "
        "(`--config`, YAML or JSON, keyed by the setting's name), then the default.\n\n" + "\n".join(rows) + "\n"
    )


# -- CLI ------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_page() -> str:
    from meshserve.server.cli import _parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the same page everywhere
    parts = ["# CLI reference\n", "Generated from the `meshserve` argparse parser by `docs/generate.py`.\n"]

    def walk(parser: argparse.ArgumentParser, depth: int) -> None:
        parts.append(f"{'#' * depth} `{parser.prog}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
        for sub in _subparsers(parser).values():
            walk(sub, min(depth + 1, 4))

    walk(_parser(), 2)
    return "\n".join(parts)


# -- API ------------------------------------------------------------------------------
def api_page(out: Path) -> str:
    from meshserve.server.compose import build_process
    from meshserve.server.settings import Settings

    app = build_process(Settings(model_dir=None)).rest_app
    doc = app.openapi() if hasattr(app, "openapi") else _fastapi_of(app).openapi()
    (out / "openapi.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    rows = ["| method | path | summary |", "| --- | --- | --- |"]
    for path, ops in sorted(doc.get("paths", {}).items()):
        for method, op in sorted(ops.items()):
            rows.append(f"| {method.upper()} | `{path}` | {op.get('summary', '')} |")
    proto = (REPO / "protocol" / "grpc" / "grpc_service.proto").read_text()
    return (
        "# API\n\n## REST\n\n"
        "The OpenAPI document of a running server is at `/openapi.json` (and `/docs`); the same "
        "document, generated by `docs/generate.py`: [openapi.json](openapi.json).\n\n"
        + "\n".join(rows)
        + "\n\n## gRPC\n\nThe Open Inference Protocol v2 service (KServe's `grpc_service.proto`), served on "
        "`--grpc-port`:\n\n```protobuf\n" + proto.rstrip() + "\n```\n"
    )


def _fastapi_of(app: Any) -> Any:
    """The FastAPI app behind the raw ASGI front (server/rest/front.py)."""
    for name in ("app", "fallback", "api"):
        inner = getattr(app, name, None)
        if inner is not None and hasattr(inner, "openapi"):
            return inner
    raise RuntimeError(f"no FastAPI app found behind {type(app).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the generated documentation pages")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder to write into (default: docs/)")
    out = parser.parse_args(argv).docs
    sys.path.insert(0, str(REPO))
    reference = out / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    for old in reference.glob("*.md"):
        old.unlink()
    (reference / "settings.md").write_text(settings_page())
    (reference / "cli.md").write_text(cli_page())
    (reference / "api.md").write_text(api_page(reference))
    print("docs/generate.py: reference/settings.md, reference/cli.md, reference/api.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
