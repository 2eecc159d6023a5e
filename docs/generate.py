"""Write the documentation pages that come from the code, so they cannot drift from it
(``make docs`` runs this, then ``mkdocs build --strict``):

- ``reference/settings.md``: every field of ``Settings`` with its type, default, environment
  variable, config key and ``serve`` flag (read from ``serve_overrides``, the one place flags
  become settings), described by the comments beside the field in server/settings.py;
- ``reference/cli.md``: every ``meshserve`` command's ``--help``, from the argparse parser;
- ``reference/api.md`` with ``openapi.json``: the REST routes of the OpenAPI document, and the proto;
- ``features/*.md``: the README's sections, one page each (the README stays their one source).

    python docs/generate.py   # writes under docs/reference and docs/features (git-ignored)
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
# README sections with a page of their own elsewhere (getting-started.md, concepts.md).
NOT_FEATURES = {"Two commands", "Try it", "Architecture"}
OPERATIONS = {"Security", "Production", "Docker", "Kubernetes and KServe", "Performance"}


def slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


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


# -- README sections ------------------------------------------------------------------
def readme_sections() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    out = []
    for section in sections:
        heading, _, body = section.partition("\n")
        out.append((heading.strip(), body))
    return out


def _page_of(heading: str) -> str:
    if heading in NOT_FEATURES:
        return "getting-started.md"
    return f"{'operations' if heading in OPERATIONS else 'features'}/{slug(heading)}.md"


def feature_pages(out: Path) -> list[str]:
    sections = readme_sections()
    # README anchors (#security, #dynamic-batching) -> the page that now holds that heading.
    anchors: dict[str, str] = {}
    for heading, body in sections:
        anchors[slug(heading)] = _page_of(heading)
        for sub in re.findall(r"^###+ (.+)$", body, flags=re.M):
            anchors.setdefault(slug(sub), f"{_page_of(heading)}#{slug(sub)}")
    written = []
    for heading, body in sections:
        if heading in NOT_FEATURES:
            continue
        page = out / _page_of(heading)
        here = _page_of(heading)

        def relink(m: re.Match, here: str = here) -> str:
            target = anchors.get(m.group(1))
            if target is None or target.startswith(f"{here}#"):
                return m.group(0)
            return f"](../{target})"

        body = re.sub(r"\]\(#([\w-]+)\)", relink, body)
        body = re.sub(r"\]\(docs/", "](../", body)  # README links into docs/ (pictures), from a page one level down
        # One level up: the section's ### become the page's ##.
        body = re.sub(r"^###", "##", body, flags=re.M)
        page.write_text(f"# {heading}\n\n<!-- generated from README.md by docs/generate.py -->\n{body}")
        written.append(str(page.relative_to(out)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the generated documentation pages")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder to write into (default: docs/)")
    out = parser.parse_args(argv).docs
    sys.path.insert(0, str(REPO))
    reference = out / "reference"
    for folder in (reference, out / "features", out / "operations"):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.md"):
            old.unlink()
    (reference / "settings.md").write_text(settings_page())
    (reference / "cli.md").write_text(cli_page())
    (reference / "api.md").write_text(api_page(reference))
    pages = feature_pages(out)
    print(f"docs/generate.py: reference/settings.md, reference/cli.md, reference/api.md, {len(pages)} README pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
