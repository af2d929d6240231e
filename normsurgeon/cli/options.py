"""Typer options that several commands share: one declaration and one help text each (one name per idea
across commands), choices shown as ``[a|b]`` and checked, dtype aliases, hidden deprecated spellings,
and the exit-code epilog of the commands that show it.

>>> import typer
>>> isinstance(AllowPickle, typer.models.OptionInfo)
True
>>> EPILOG.startswith("Exit codes: 0 success")
True
>>> canonical_dtype("bf16"), canonical_dtype("auto"), canonical_dtype("float32")
('bfloat16', 'source', 'float32')
"""
from __future__ import annotations

from typing import Any, Iterable

import typer

from normsurgeon.cli.console import err_console, is_quiet, is_verbose, set_verbosity
from normsurgeon.errors import EXIT_CODES

EPILOG = "Exit codes: " + "; ".join(f"{k} {v.split(':')[0]}" for k, v in EXIT_CODES.items()) + "."

DTYPES = ("source", "float64", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"auto": "source", "fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def canonical_dtype(name: str) -> str:
    """``name`` or its alias (``fp16``, ``bf16``, ``fp32``, ``fp64``, ``auto`` = the source's dtype) as the
    library's dtype name; ValueError for anything else."""
    key = str(name).strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"{name!r} is not a dtype: use {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")
    return key


def choice(default: Any, values: Iterable[str], *decls: str, help: str, aliases: dict[str, str] | None = None,
           **kw: Any) -> Any:
    """An option taking one of ``values`` (or an alias of one), shown as ``[a|b|c]`` with its default;
    anything else is a usage error (exit 2). The command gets the canonical value; aliases are accepted
    but not listed in the metavar (say them in ``help``)."""
    values, aliases = list(values), dict(aliases or {})
    what = decls[-1].lstrip("-").replace("-", " ")

    def check(value):
        if value is None:
            return None
        key = str(value).strip().lower()
        key = aliases.get(key, key)
        if key not in values:
            raise typer.BadParameter(f"unknown {what} {value!r}; choose one of {', '.join(values + list(aliases))}")
        return key

    return typer.Option(default, *decls, metavar="[" + "|".join(values) + "]", callback=check, help=help, **kw)


def dtype_option(default: str = "source", *, help: str = "Output dtype (source: the source's own).") -> Any:
    """``--dtype`` wherever a dtype is taken: the library's names and the aliases fp16, bf16, fp32, fp64, auto."""
    return choice(default, DTYPES, "--dtype", help=help + " Aliases: auto (= source), fp64, fp32, bf16, fp16.",
                  aliases=DTYPE_ALIASES)


def deprecated(new: str, *decls: str) -> Any:
    """A hidden old spelling of ``new``, still accepted (a ``·`` note says so); the command prefers it when
    given (``prefer``)."""
    def warn(value):
        if value is not None and value is not False:
            err_console.print(f"[dim]· {decls[0]} is deprecated: use {new}[/]", highlight=False)
        return value

    return typer.Option(None, *decls, hidden=True, callback=warn)


def prefer(old: Any, new: Any) -> Any:
    """The value of a deprecated spelling when it was given, else the canonical option's."""
    return new if old is None else old


def _verbosity(level: int):
    def set_level(value: bool) -> bool:
        if value:
            if (level < 0 and is_verbose()) or (level > 0 and is_quiet()):
                raise typer.BadParameter("-q/--quiet and -v/--verbose exclude each other")
            set_verbosity(level)
        return value
    return set_level


QUIET_HELP = "No status lines or progress on stderr (results and errors still print)."
VERBOSE_HELP = "Debug details on stderr: versions, resolved options, elapsed time on each status line."

ModelArg = typer.Argument(..., metavar="MODEL", help="Local folder, cached hub id, or package.module:factory.")
AllowPickle = typer.Option(False, "--allow-pickle", help="Allow pickle checkpoints (loaded with weights_only=True).")
TrustRemote = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code from its folder.")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON on stdout (fields: docs/json.md).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace OUT if it is an earlier normsurgeon output.")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Progress on stderr: bars on a terminal, else "
                           "timestamped lines every NORMSURGEON_PROGRESS_EVERY seconds (30).")
QuietOpt = typer.Option(False, "-q", "--quiet", callback=_verbosity(-1), help=QUIET_HELP)
VerboseOpt = typer.Option(False, "-v", "--verbose", callback=_verbosity(1), help=VERBOSE_HELP)
SeqLenHelp = "Window length in tokens"
MAX_LOGPROB_HELP = ("Pass verification when max |Δ log-prob| is at most this, instead of the output dtype's own "
                    "threshold (recorded in the report as explicit_threshold).")
MicroBatchHelp = "Windows per forward pass (per process)."


def device_option() -> Any:
    """``--device`` on the commands that can place their model: checked at once (exit 2 for a CUDA device
    on a machine without CUDA); the command gets the resolved device (``auto`` becomes cuda or cpu)."""
    from normsurgeon.cli.device import DEVICE_HELP, resolve_device

    def check(value: str) -> str:
        try:
            return resolve_device(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

    return typer.Option("auto", "--device", metavar="[auto|cpu|cuda|cuda:N]", callback=check, help=DEVICE_HELP)
