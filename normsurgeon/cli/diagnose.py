"""The ``diagnose`` command (added to ``normsurgeon.cli``'s app by ``register(app)``); a thin layer over
``normsurgeon.diagnose.run.run_diagnose``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['diagnose']
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli.console import out_console, status
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import (AllowPickle, JsonOpt, MicroBatchHelp, OverwriteOpt, ProgressOpt, QuietOpt,
                                     SeqLenHelp, TrustRemote, VerboseOpt, deprecated, prefer)
from normsurgeon.cli.output import emit


def register(app: typer.Typer) -> None:
    """Add ``diagnose`` to ``app``."""

    @app.command("diagnose", short_help="Measure per-layer statistics, gradients and the cost of removing each layer.")
    def diagnose_cmd(
        model: str = typer.Argument(..., metavar="MODEL", help="Local folder, cached hub id, factory, or a `place` output."),
        data: str = typer.Option(..., "--data", help="Text file, folder, .jsonl, saved dataset or package.module:function."),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="Report folder (report.json/.md/.html + PNGs); "
                                           "default: no files."),
        log: Optional[str] = typer.Option(None, "--log", help="Training log (JSON/JSONL/CSV/lines) for spike scores."),
        num_seqs: int = typer.Option(8, "--num-seqs", help="Number of held-out windows."),
        seq_len: int = typer.Option(512, "--seq-len", help=SeqLenHelp + " (capped at the model's positions)."),
        micro_batch_size: int = typer.Option(2, "--micro-batch-size", help=MicroBatchHelp),
        micro_batch: Optional[int] = deprecated("--micro-batch-size", "--micro-batch"),
        removal_seqs: Optional[int] = typer.Option(2, "--removal-seqs", help="Windows used for the single-layer removal "
                                                   "losses (the most expensive part: one pass per layer)."),
        grad_seqs: Optional[int] = typer.Option(4, "--grad-seqs", help="Windows used for gradient norms (hidden-state "
                                                "statistics always use all windows)."),
        grads: bool = typer.Option(True, "--grads/--no-grads", help="Gradient norms (one backward pass)."),
        removal: bool = typer.Option(True, "--removal/--no-removal", help="Single-layer removal losses."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw PNGs (with -o)."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="'bytes' or a tokenizer folder."),
        text_field: str = typer.Option("text", "--text-field", help="Field of JSONL rows / dataset column."),
        seed: int = typer.Option(1234, "--seed", help="Seed of the window positions."),
        overwrite: bool = OverwriteOpt,
        progress: bool = ProgressOpt,
        allow_pickle: bool = AllowPickle,
        trust_remote_code: bool = TrustRemote,
        as_json: bool = JsonOpt,
        quiet: bool = QuietOpt,
        verbose: bool = VerboseOpt,
    ) -> None:
        """Per-layer variance/RMS, massive activations, gradient norms (block, FFN), angular distances,
        single-layer removal Δloss and, with --log, loss-spike scores.

        States are raw block outputs (hooks), not `hidden_states` (whose last entry is after the final norm).

        \b
        Example:
          normsurgeon diagnose examples/tiny-gpt2 \\
              --data examples.stdlib_corpus:load_stdlib_corpus -o diag
        """
        def go() -> int:
            from normsurgeon.cli.progress import progress_for
            from normsurgeon.diagnose.report import headline
            from normsurgeon.diagnose.run import run_diagnose

            with progress_for(progress and not as_json) as bar:
                r = run_diagnose(model, data, out, num_sequences=num_seqs, seq_len=seq_len, seed=seed, log=log,
                                 micro_batch=prefer(micro_batch, micro_batch_size), grads=grads, removal=removal,
                                 removal_sequences=removal_seqs, grad_sequences=grad_seqs, tokenizer=tokenizer,
                                 text_field=text_field, plots=plots, overwrite=overwrite, allow_pickle=allow_pickle,
                                 trust_remote_code=trust_remote_code, say=status(not as_json), progress=bar)
            if as_json:
                emit(r, "diagnose")
                return 0
            for line in headline(r):
                out_console.print(f"· {line}", highlight=False, markup=False, soft_wrap=True)
            if out is not None:
                out_console.print(f"wrote {out}/report.html, report.md, report.json" +
                                  (f" and {len(r.get('plots', []))} plots" if r.get("plots") else ""), highlight=False)
            return 0

        run_command(go)
