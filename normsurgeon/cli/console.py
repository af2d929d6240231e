"""Where the command line prints: stdout for results, stderr for ``error:`` lines and ``·`` status lines,
and how much it says (``-q``: no status lines or progress; ``-v``: debug details too).

>>> say_error("x" * 500).endswith("…"), len(say_error("x" * 500))
(True, 400)
>>> set_verbosity(-1); is_quiet(), is_verbose()
(True, False)
>>> set_verbosity(0)
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape

out_console = Console()
err_console = Console(stderr=True)

_MAX_LINE = 400
_state = {"level": 0, "t0": time.perf_counter()}


def set_verbosity(level: int) -> None:
    """-1 quiet, 0 normal, 1 verbose; the clock of verbose status lines restarts."""
    _state["level"], _state["t0"] = level, time.perf_counter()


def is_quiet() -> bool:
    return _state["level"] < 0


def is_verbose() -> bool:
    return _state["level"] > 0


def say_error(message: str) -> str:
    """Print ``message`` as one ``error:`` line on stderr (whitespace folded, at most about 400
    characters); return the line."""
    line = " ".join(message.split())
    if len(line) > _MAX_LINE:
        line = line[: _MAX_LINE - 1] + "…"
    prefix = "" if line.startswith("internal error") else "error: "
    err_console.print(f"[bold red]{prefix}[/]{escape(line)}", highlight=False, soft_wrap=True)
    return line


def _elapsed() -> str:
    return f"[{time.perf_counter() - _state['t0']:7.1f}s] " if is_verbose() else ""


def status(enabled: bool):
    """A ``say(msg)`` that prints ``· msg`` on stderr when ``enabled`` (not with ``--json``) and not quiet;
    verbose: with the seconds since the command started."""
    def say(msg: str) -> None:
        if enabled and not is_quiet():
            err_console.print(f"[dim]· {_elapsed()}{escape(msg)}[/]", highlight=False, soft_wrap=True)
    return say


def debug(msg: str) -> None:
    """``· debug: msg`` on stderr with ``-v``."""
    if is_verbose():
        err_console.print(f"[dim]· {_elapsed()}debug: {escape(msg)}[/]", highlight=False, soft_wrap=True)
