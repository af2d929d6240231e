"""The click that typer runs on: recent typer releases vendor their own copy (``typer._click``), older
ones use the ``click`` package. Exceptions and the current context must come from the same one.

>>> issubclass(UsageError, ClickException)
True
"""
from __future__ import annotations

try:
    from typer._click.exceptions import ClickException, UsageError
    from typer._click.globals import get_current_context
except ImportError:  # typer < 0.2x: plain click
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]
    from click.globals import get_current_context  # type: ignore[no-redef]

__all__ = ["ClickException", "UsageError", "get_current_context"]
