"""Resolve ``package.module:attribute`` references (model factories, data factories).

The current directory is importable, so repository-relative modules such as ``examples.tiny_vit.vit``
work from the project root.

>>> resolve_attribute("normsurgeon.testing:tiny_gpt2").__name__
'tiny_gpt2'
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from normsurgeon.errors import InputError


def resolve_attribute(spec: str, what: str = "factory") -> Any:
    """Import ``module`` and return ``module.attr`` (dotted attributes allowed); InputError otherwise, in
    one line that says how to fix a module that is not on the path (``import_hint``)."""
    module_name, _, attr = spec.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # the current folder, whatever the entry point (a console script has no '')
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot load {what} {spec!r}: {import_hint(module_name, e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"cannot load {what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def import_hint(module_name: str, e: ImportError) -> str:
    """The import failure, and how to fix it: a module of the reference itself that is not on the path
    gets the folder to put on ``PYTHONPATH`` (found beside the current folder or normsurgeon's own
    checkout, else described); a missing dependency of the module is named as such.

    >>> import_hint("no_such_pkg_xyz.model", ModuleNotFoundError("No module named 'no_such_pkg_xyz'", name="no_such_pkg_xyz"))
    "no module named 'no_such_pkg_xyz' ... set PYTHONPATH to the folder that contains no_such_pkg_xyz/ ..."
    """
    missing = getattr(e, "name", None)
    parts = module_name.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    if not isinstance(e, ModuleNotFoundError) or missing not in prefixes:
        where = f"importing {module_name!r} failed: " if missing != module_name else ""
        extra = f" (install {missing.split('.')[0]!r}?)" if isinstance(e, ModuleNotFoundError) and missing else ""
        return f"{where}{e}{extra}"
    top = parts[0]
    found = _folder_holding(top)
    fix = (f"run from {found} or set PYTHONPATH={found}" if found is not None else
           f"run from the folder that contains {top}/ or set PYTHONPATH to the folder that contains {top}/")
    return (f"no module named {missing!r} on the Python path (the current folder {Path.cwd()} is searched too); "
            f"{fix} (e.g. `PYTHONPATH={found or '/path/to/project'} normsurgeon ...`)")


def _folder_holding(top: str) -> Path | None:
    """A folder with a package or module ``top`` in it: the current folder's ancestors, then the folder
    holding normsurgeon's own checkout (its ``examples`` package)."""
    here = Path.cwd()
    candidates = [*here.parents, Path(__file__).resolve().parents[2]]  # normsurgeon/io/factory.py -> checkout
    for folder in candidates:
        if (folder / top / "__init__.py").is_file() or (folder / f"{top}.py").is_file():
            return folder
    return None
