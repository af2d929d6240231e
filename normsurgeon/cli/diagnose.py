"""The ``diagnose`` command (added to ``normsurgeon.cli``'s app by ``register(app)``); a thin layer over
``normsurgeon.diagnose.run.run_diagnose``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['diagnose']
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli.console import out_console, status
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import OverwriteOpt


def register(app: typer.Typer) -> None:
    """Add ``diagnose`` to ``app``."""

    @app.command("diagnose")
    def diagnose_cmd(
        model: str = typer.Argument(..., metavar="MODEL", help="Local folder, cached hub id, factory, or a `place` output."),
        data: str = typer.Option(..., "--data", help="Text file, folder, .jsonl, saved dataset or package.module:function."),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="Report folder (report.json/.md/.html + PNGs); "
                                           "default: no files."),
        log: Optional[str] = typer.Option(None, "--log", help="Training log (JSON/JSONL/CSV/lines) for spike scores."),
        num_seqs: int = typer.Option(8, "--num-seqs", help="Number of held-out windows."),
        seq_len: int = typer.Option(512, "--seq-len", help="Window length (capped at the model's positions)."),
        micro_batch: int = typer.Option(2, "--micro-batch", help="Windows per forward pass."),
        removal_seqs: Optional[int] = typer.Option(2, "--removal-seqs", help="Windows used for the single-layer removal losses (default 2; the most expensive part: one pass per layer)."),
        grad_seqs: Optional[int] = typer.Option(4, "--grad-seqs", help="Windows used for gradient norms (default 4; hidden-state statistics always use all windows)."),
        no_grads: bool = typer.Option(False, "--no-grads", help="Skip the backward pass (no gradient norms)."),
        no_removal: bool = typer.Option(False, "--no-removal", help="Skip single-layer removal."),
        no_plots: bool = typer.Option(False, "--no-plots", help="Do not draw PNGs."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="'bytes' or a tokenizer folder."),
        seed: int = typer.Option(1234, "--seed", help="Seed of the window positions."),
        overwrite: bool = OverwriteOpt,
        as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON on stdout."),
    ) -> None:
        """Per-layer variance/RMS, massive activations, gradient norms (block, FFN), angular distances,
        single-layer removal Δloss and, with --log, loss-spike scores.

        States are raw block outputs (hooks), not `hidden_states` (whose last entry is after the final norm).
        Example: normsurgeon diagnose examples/tiny-gpt2 --data examples.stdlib_corpus:load_stdlib_corpus -o diag
        """
        def go() -> int:
            from normsurgeon.diagnose.report import headline
            from normsurgeon.diagnose.run import run_diagnose

            r = run_diagnose(model, data, out, num_sequences=num_seqs, seq_len=seq_len, seed=seed, log=log,
                             micro_batch=micro_batch, grads=not no_grads, removal=not no_removal,
                             removal_sequences=removal_seqs, grad_sequences=grad_seqs, tokenizer=tokenizer, plots=not no_plots,
                             overwrite=overwrite, say=status(not as_json))
            if as_json:
                print(json.dumps(r, indent=2, default=str))
                return 0
            for line in headline(r):
                out_console.print(f"· {line}", highlight=False, markup=False)
            if out is not None:
                out_console.print(f"wrote {out}/report.html, report.md, report.json" +
                                  (f" and {len(r.get('plots', []))} plots" if r.get("plots") else ""), highlight=False)
            return 0

        run_command(go)
