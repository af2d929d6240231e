"""The ``normsurgeon`` Typer application: the root options, every command in the order ``--help`` lists
them, and ``main`` (the console script).
"""
from __future__ import annotations

import sys

import typer

from normsurgeon.cli import (click_compat, convert, diagnose, fold_bn, inspect, place, plan, prepbn, recipes,
                             remove_ln, rotate, verify)
from normsurgeon.cli.console import err_console, out_console, set_verbosity
from normsurgeon.cli.exits import print_usage_error
from normsurgeon.cli.options import EPILOG, QuietOpt, VerboseOpt
from normsurgeon.version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Surgery on the normalization layers of PyTorch and Hugging Face models.\n\n"
                       "MODEL is a local Hugging Face folder, a hub id already in the local cache "
                       "(offline), or a factory `package.module:function` returning a torch module.",
                  epilog=EPILOG)


def _version(value: bool) -> None:
    if value:
        out_console.print(f"normsurgeon {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          quiet: bool = QuietOpt, verbose: bool = VerboseOpt) -> None:
    """-q / -v here apply to the command that follows (each command also takes them)."""
    set_verbosity(-1 if quiet else 1 if verbose else 0)


for _command in (inspect, convert, verify, recipes, fold_bn, remove_ln, place, diagnose, plan, prepbn, rotate):
    _command.register(app)


def main(argv: list[str] | None = None) -> int:
    """The console script: run the command; a usage error (unknown option, missing argument) is one line
    and exit 2, like every other error."""
    argv = sys.argv[1:] if argv is None else argv
    set_verbosity(0)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="normsurgeon", standalone_mode=False)
    except click_compat.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `normsurgeon` or `normsurgeon CMD`: the help
            print(e.format_message())
            return 2
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print_usage_error(e.format_message() + hint, "--json" in argv)
        return 2
    except click_compat.ClickException as e:
        print_usage_error(e.format_message(), "--json" in argv)
        return e.exit_code
    except typer.Abort:
        err_console.print("[bold red]error:[/] interrupted", highlight=False)
        return 130
    return code if isinstance(code, int) else 0
