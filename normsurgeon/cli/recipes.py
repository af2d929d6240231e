"""The ``recipes`` command: the built-in recipes (``normsurgeon.recipes``), as lines or ``--json``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['recipes']
"""
from __future__ import annotations

import typer

from normsurgeon.cli.console import out_console
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import EPILOG, JsonOpt, QuietOpt, VerboseOpt
from normsurgeon.cli.output import emit


def register(app: typer.Typer) -> None:
    """Add ``recipes`` to ``app``."""

    @app.command("recipes", epilog=EPILOG, short_help="List the built-in recipes.")
    def recipes_cmd(json_out: bool = JsonOpt, quiet: bool = QuietOpt, verbose: bool = VerboseOpt) -> None:
        """List the built-in recipes (recipes/*.yaml): name, target and what each does.

        \b
        Example:
          normsurgeon recipes --json
        """
        def go() -> None:
            from normsurgeon.recipes import builtin_recipes, load_recipe

            rows = [load_recipe(name).model_dump() for name in builtin_recipes()]
            if json_out:
                emit({"recipes": rows}, "recipes")
                return
            for r in rows:
                out_console.print(f"[bold]{r['name']}[/] ({r['target']}): {r['description'].strip()}", highlight=False)
        run_command(go)
