"""The ``verify`` command: does a converted folder compute the same function as its source (exit 3 if
not); whole models (``normsurgeon.verification``) or block by block (``--layerwise``, streaming).

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.callback.__name__ for c in app.registered_commands]
['verify']
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli.console import out_console
from normsurgeon.cli.exits import run_command, verification_exit
from normsurgeon.cli.options import (EPILOG, MAX_LOGPROB_HELP, AllowPickle, JsonOpt, ProgressOpt, QuietOpt,
                                     SeqLenHelp, TrustRemote, VerboseOpt, deprecated, prefer)
from normsurgeon.cli.output import emit


def register(app: typer.Typer) -> None:
    """Add ``verify`` to ``app``."""

    @app.command(epilog=EPILOG, short_help="Check that a converted model computes the same function as its source.")
    def verify(
        source: str = typer.Argument(..., help="The source model (as for MODEL)."),
        converted: str = typer.Argument(..., help="The converted folder."),
        text: Optional[Path] = typer.Option(None, "--text", help="Compare on this text file."),
        images: Optional[Path] = typer.Option(None, "--images", help="Compare on the images in this folder (vision models)."),
        stock: bool = typer.Option(False, "--stock", help="Load the converted folder with the plain Hugging Face class."),
        num_seqs: int = typer.Option(4, "--num-seqs", min=1, help="Sequences (or images) in the built-in batch."),
        num_old: Optional[int] = deprecated("--num-seqs", "--num"),
        seq_len: int = typer.Option(64, "--seq-len", min=1, help=SeqLenHelp + " of the built-in batch."),
        seed: int = typer.Option(0, "--seed", help="Seed of the built-in batch."),
        max_logprob_delta: Optional[float] = typer.Option(None, "--max-logprob-delta", min=0.0,
                                                         metavar="<float>", help=MAX_LOGPROB_HELP),
        json_out: bool = JsonOpt,
        allow_pickle: bool = AllowPickle,
        trust_remote_code: bool = TrustRemote,
        layerwise: bool = typer.Option(False, "--layerwise", help="Load one block of each model at a time (models "
                                                                  "larger than memory); reports per-block errors."),
        progress: bool = ProgressOpt,
        quiet: bool = QuietOpt,
        verbose: bool = VerboseOpt,
    ) -> None:
        """Check that CONVERTED computes the same function as SOURCE (exit 3 if not).

        Compares log-probabilities (shift-invariant), KL, top-1 agreement and, for information, raw logits,
        plus the residual stream at each converted norm's input to locate a bad fold. Thresholds depend on
        the converted checkpoint's dtype: float64 1e-10, float32 1e-4, float16 3e-2, bfloat16 1.5e-1.

        \b
        Example:
          normsurgeon verify examples/tiny-gpt2 out/tiny-gpt2-rms
        """
        num = prefer(num_old, num_seqs)
        if layerwise:  # --- streaming (normsurgeon/cli/streaming.py, issue 6) ---
            def go_layerwise() -> int:
                from normsurgeon.cli import streaming as cs
                from normsurgeon.cli.progress import progress_for
                from normsurgeon.errors import UsageError

                if max_logprob_delta is not None:
                    raise UsageError("--max-logprob-delta applies to whole-model verification, not --layerwise")
                with progress_for(progress and not json_out) as bar:
                    return cs.run_layerwise_verify(source, converted, num=num, seq_len=seq_len, seed=seed, text=text,
                                                   json_out=json_out, console=out_console, progress=bar)
            run_command(go_layerwise)

        def go() -> int:
            from normsurgeon.verification.api import verify as do_verify
            from normsurgeon.verification.report import print_report

            report = do_verify(source, converted, stock=stock, num=num, seq_len=seq_len, seed=seed, text_file=text,
                               image_dir=images, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                               max_logprob_delta=max_logprob_delta)
            if json_out:
                emit(report, "equivalence")
            else:
                print_report(report, out_console)
            return verification_exit(report)
        run_command(go)
