"""The ``inspect`` command: the norm map of a model, as tables or ``--json``; a thin layer over
``normsurgeon.inspect.inspect_model``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.callback.__name__ for c in app.registered_commands]
['inspect']
"""
from __future__ import annotations

import typer
from rich.table import Table

from normsurgeon.cli.console import out_console
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import EPILOG, AllowPickle, JsonOpt, ModelArg, QuietOpt, TrustRemote, VerboseOpt
from normsurgeon.cli.output import emit


def register(app: typer.Typer) -> None:
    """Add ``inspect`` to ``app``."""

    @app.command(epilog=EPILOG, short_help="Show every norm, its role and which recipes apply.")
    def inspect(model: str = ModelArg, json_out: bool = JsonOpt, allow_pickle: bool = AllowPickle,
                trust_remote_code: bool = TrustRemote, quiet: bool = QuietOpt, verbose: bool = VerboseOpt) -> None:
        """Show every norm, its role, readers and writers, each block's placement, and which recipes apply.

        Roles: pre (reads the residual before a block), final (reads it before the heads), post (the norm's
        output is the residual: Post-LN), output (normalizes a sublayer output: Peri-LN), embedding, inner
        (QK-norms and other norms off the residual stream, never touched).

        \b
        Example:
          normsurgeon inspect examples/tiny-gpt2
        """
        def go() -> None:
            from normsurgeon.inspect import inspect_model

            info = inspect_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            if json_out:
                emit(info, "inspect")
                return
            _print_inspect(info)
        run_command(go)


def _print_inspect(info: dict) -> None:
    out_console.print(f"[bold]{info['architecture']}[/] ({info['dtype']}), hidden size {info['hidden_size']}, "
                      f"placement: [bold]{info['placement']}[/]")
    t = Table(title="norms")
    for col in ("norm", "class", "role", "eps", "readers"):
        t.add_column(col, overflow="fold")
    for n in info["norms"]:
        readers = ", ".join(r.rsplit(".", 1)[-1] for r in n["readers"]) or "—"
        t.add_row(n["name"], n["class"], n["role"], str(n["eps"]), readers)
    out_console.print(t)
    writers = ", ".join(f"{w['name']} ({w['kind']})" for w in info["writers"])
    out_console.print(f"[bold]residual writers[/] ({len(info['writers'])}): {writers}", highlight=False)
    placements: dict[str, int] = {}
    for b in info["blocks"]:
        placements[b["placement"]] = placements.get(b["placement"], 0) + 1
    out_console.print("[bold]blocks[/]: " + ", ".join(f"{k} x{v}" for k, v in placements.items()))
    for target, r in info["recipes"].items():
        if r["applies"]:
            out_console.print(f"[green]✓[/] convert --to {target}: exact")
        else:
            out_console.print(f"[red]✗[/] convert --to {target}: " + "; ".join(r["why_not"]), highlight=False)
