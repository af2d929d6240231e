"""The ``plan`` command: a conversion planned from config.json and the safetensors headers only
(``normsurgeon.cli.streaming.run_plan``, the same as ``convert --dry-run``).

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['plan']
"""
from __future__ import annotations

from typing import Optional

import typer

from normsurgeon.cli.console import out_console
from normsurgeon.cli.convert import BIAS_POLICIES, TARGETS
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import EPILOG, JsonOpt, QuietOpt, VerboseOpt, choice, dtype_option
from normsurgeon.cli.streaming import run_plan


def register(app: typer.Typer) -> None:
    """Add ``plan`` to ``app``."""

    @app.command("plan", epilog=EPILOG, short_help="Plan a conversion from the safetensors headers alone.")
    def plan_cmd(
        model: str = typer.Argument(..., metavar="MODEL", help="A local safetensors model folder."),
        to: str = choice("rmsnorm", TARGETS, "--to", help="rmsnorm: Pre-RMSNorm; crmsnorm: Pre-CRMSNorm (width d-1)."),
        bias_policy: Optional[str] = choice(None, BIAS_POLICIES, "--bias-policy",
                                            help="As for convert (default: the recipe's, stock)."),
        dtype: str = dtype_option(),
        max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Refuse (exit 6) a plan above this, e.g. 4GiB."),
        json_out: bool = JsonOpt,
        quiet: bool = QuietOpt,
        verbose: bool = VerboseOpt,
    ) -> None:
        """Plan a conversion from config.json and the safetensors headers only (no weights are read).

        Prints the tensor inventory (transformed, copied, added, dropped; an unaccounted tensor is an
        error), the groups in processing order and the estimated peak memory. Same as
        `convert MODEL -o OUT --dry-run`.

        \b
        Example:
          normsurgeon plan examples/tiny-gpt2 --max-memory 4GiB
        """
        run_command(lambda: run_plan(model, to, bias_policy, dtype, max_memory, json_out, out_console))
