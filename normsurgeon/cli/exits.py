"""Every failure of a command becomes one ``error:`` line on stderr and a documented exit code
(``normsurgeon.errors.EXIT_CODES``); with ``--json`` also a ``normsurgeon.error/1`` object on stdout.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import typer

from normsurgeon.cli import click_compat
from normsurgeon.cli.console import debug, err_console, is_verbose, say_error
from normsurgeon.cli.output import SCHEMAS
from normsurgeon.errors import NormSurgeonError

ERROR_SCHEMA = SCHEMAS["error"]
_OUTPUT_PARAMS = ("out", "checkpoint_dir")
_JSON_PARAMS = ("json_out", "as_json")


def _command_params() -> dict:
    ctx = click_compat.get_current_context(silent=True)
    return dict(ctx.params) if ctx is not None else {}


def run_command(fn: Callable[[], int | None]) -> None:
    """Call ``fn``; map errors to one line on stderr and the documented exit code.

    The command's own parameters say where its outputs are (``out``, ``checkpoint_dir``: an OSError
    there is exit 2, elsewhere exit 5, a full disk exit 6) and whether ``--json`` was given (then the
    error is also printed on stdout as a ``normsurgeon.error/1`` object, with its details).
    """
    params = _command_params()
    outputs = [params.get(k) for k in _OUTPUT_PARAMS if params.get(k) is not None]
    as_json = any(params.get(k) for k in _JSON_PARAMS)
    if is_verbose():
        _debug_header(params)
    try:
        code = fn() or 0
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        _fail(130, "interrupted", "Interrupted", None, as_json)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and a documented exit code
        if os.environ.get("NORMSURGEON_DEBUG"):
            raise
        if is_verbose() and not isinstance(e, NormSurgeonError):
            err_console.print_exception()
        if isinstance(e, OSError):
            from normsurgeon.io.destination import user_error_for

            e = user_error_for(e, outputs)
        if isinstance(e, NormSurgeonError):
            _fail(e.exit_code, str(e), type(e).__name__, e.details, as_json)
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(1, f"internal error: {type(e).__name__}: {text} (set NORMSURGEON_DEBUG=1 for a traceback)",
              type(e).__name__, None, as_json)
    raise typer.Exit(code)


def _debug_header(params: dict) -> None:
    import platform

    import torch
    import transformers

    from normsurgeon.version import __version__

    debug(f"normsurgeon {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}; CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    debug("options: " + ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("quiet", "verbose")))


def _fail(code: int, message: str, kind: str, details: object, as_json: bool) -> None:
    """One line on stderr (and, with --json, an error object on stdout with the whole message); exit ``code``."""
    line = say_error(message or kind)
    if details is None and line != " ".join(message.split()):
        details = {"message": message}
    if as_json:
        print(json.dumps({"schema": ERROR_SCHEMA, "status": "error", "exit_code": code, "error": kind,
                          "message": line, "details": details}, indent=2, default=str))
    raise typer.Exit(code)


def print_usage_error(message: str, as_json: bool) -> None:
    """A usage error (unknown option, missing argument): one line, and with --json the error object."""
    line = say_error(message)
    if as_json:
        print(json.dumps({"schema": ERROR_SCHEMA, "status": "error", "exit_code": 2, "error": "UsageError",
                          "message": line, "details": None}, indent=2))


def verification_exit(report: dict) -> int:
    """0 for a passed verification; else one ``error:`` line naming what failed and where, and exit 3."""
    if report["status"] == "pass":
        return 0
    from normsurgeon.verification.report import failure_line

    say_error(f"verification failed: {failure_line(report)}")
    return 3
