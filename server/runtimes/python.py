"""The Python runtime: a user's ``Model`` subclass named by import path.

``implementation`` is ``module.path:Class`` (importable) or ``file.py:Class``
relative to the model directory. Each load imports the file afresh, so a
reload picks up edited code and two models may both ship a ``model.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from pathlib import Path

from meshserve.protocol.errors import ModelLoadError

_counter = itertools.count()


def import_object(spec: str, base_dir: Path | None = None) -> object:
    """Resolve ``module:attr`` or ``path/to/file.py:attr`` to the object."""
    module_part, sep, attr = spec.partition(":")
    if not sep:
        module_part, _, attr = spec.rpartition(".")
    if not module_part or not attr:
        raise ModelLoadError(f"cannot import {spec!r}: expected 'module:Class' or 'file.py:Class'")
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ModelLoadError(f"cannot import {spec!r}: {path.name} not found")
        mod_name = f"meshserve_user_code_{next(_counter)}_{path.stem}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise ModelLoadError(f"cannot import {spec!r}")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module  # while it runs, for dataclasses and the like
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:
            raise ModelLoadError(f"importing {path.name} failed: {type(e).__name__}: {e}") from e
        finally:
            # The class keeps its module alive; once unloaded, nothing should.
            sys.modules.pop(mod_name, None)
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as e:
            raise ModelLoadError(f"cannot import module {module_part!r}: {type(e).__name__}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelLoadError(f"{module_part} has no attribute {attr!r}") from None
