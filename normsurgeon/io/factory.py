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
    """Import ``module`` and return ``module.attr`` (dotted attributes allowed); InputError otherwise."""
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot load {what} {spec!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"cannot load {what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
