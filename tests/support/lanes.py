"""Test lanes: ``system`` tests start processes or services (a meshserve server, etcd, a
registry, a subprocess); ``unit`` tests run in this process. ``make test-unit`` runs
``-m unit``. The lane is decided here, not by hand: a test is ``system`` when its module,
or the source of a fixture it uses, calls something that starts a process. The unit lane
checks itself: a unit test that starts a process fails, naming the token to add.
"""

from __future__ import annotations

import inspect
import os
import subprocess
from functools import cache
from pathlib import Path

import pytest

# What starts a process or a service in this test suite.
STARTS_PROCESS = (
    "start_server", "spawn_server", "start_registry", "start_etcd", "start_pods", "Popen", "subprocess",
    "create_subprocess", "multiprocessing", "os.fork", "make_engine",
)  # fmt: skip
UNIT_LANE_ENV = "MESHSERVE_TEST_LANE"


@cache
def _text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


@cache
def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def _starts_process(text: str) -> bool:
    return any(token in text for token in STARTS_PROCESS)


def is_system(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    if module is not None and _starts_process(_text(module.__file__ or "")):
        return True
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info is not None else ():
        for fixturedef in defs:
            if _starts_process(_source(fixturedef.func)):
                return True
    return False


def mark_lanes(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("system") is None and item.get_closest_marker("unit") is None:
            item.add_marker(pytest.mark.system if is_system(item) else pytest.mark.unit)


def guard_unit_lane() -> None:
    """In the unit lane, starting a process is a classification bug: say so at once."""
    if os.environ.get(UNIT_LANE_ENV) != "unit":
        return
    original = subprocess.Popen.__init__

    def refuse(self, args, *a, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError(
            f"a unit-lane test started a process ({args!r}): mark it @pytest.mark.system or add "
            "the helper that starts it to tests/support/lanes.py STARTS_PROCESS"
        )

    subprocess.Popen.__init__ = refuse  # type: ignore[method-assign]
    refuse.original = original  # type: ignore[attr-defined]
