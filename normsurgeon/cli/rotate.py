"""The ``rotate`` command: convert, then rotate the residual stream by an orthogonal matrix
(``normsurgeon.rotation``), exactly, for rotation-based quantization.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.callback.__name__ for c in app.registered_commands]
['rotate']
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli.console import out_console, status
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import (EPILOG, AllowPickle, JsonOpt, ModelArg, OverwriteOpt, QuietOpt, TrustRemote,
                                     VerboseOpt, choice, dtype_option)
from normsurgeon.cli.output import emit

METHODS = ("hadamard", "random")


def register(app: typer.Typer) -> None:
    """Add ``rotate`` to ``app``."""

    @app.command(epilog=EPILOG, short_help="Rotate a model's residual stream exactly, ready for quantization.")
    def rotate(
        model: str = ModelArg,
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (must not exist unless --overwrite)."),
        method: str = choice("hadamard", METHODS, "--method",
                             help="hadamard: a randomised Hadamard matrix (Sylvester sizes, else random); "
                                  "random: a seeded random orthogonal matrix."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random signs / the random matrix."),
        dtype: str = dtype_option(),
        overwrite: bool = OverwriteOpt,
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify the written checkpoint."),
        text: Optional[Path] = typer.Option(None, "--text", help="Verify on this text file instead of built-in batches."),
        max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 2GB."),
        json_out: bool = JsonOpt,
        allow_pickle: bool = AllowPickle,
        trust_remote_code: bool = TrustRemote,
        quiet: bool = QuietOpt,
        verbose: bool = VerboseOpt,
    ) -> None:
        """Convert a Pre-LN or Pre-RMSNorm model, then rotate its residual stream by an orthogonal Q, exactly.

        Every writer's output side is multiplied by Q and every reader's input side by Q^T (embeddings
        and heads included), in float64, cast once; RMS(xQ) = RMS(x) keeps the function. Models whose
        output keeps stock LayerNorms get a Q with Q1 = 1, so the output still loads in stock transformers.
        See docs/rotation.md for what it does to outliers and round-to-nearest quantization.

        \b
        Example:
          normsurgeon rotate examples/tiny-gpt2 --method hadamard \\
              -o out/tiny-gpt2-rotated
        """
        def go() -> int:
            from normsurgeon.rotation import rotate as do_rotate
            from normsurgeon.verification.report import print_report

            report = do_rotate(model, out, method=method, seed=seed, dtype=dtype, overwrite=overwrite,
                               run_verify=verify, text_file=text, max_shard_size=max_shard_size,
                               allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                               status=status(not json_out))
            if json_out:
                emit(report, "equivalence")
            else:
                print_report(report, out_console)
                load = "stock transformers or normsurgeon.load" if report.get("stock_loadable") else \
                    "normsurgeon.load only"
                out_console.print(f"wrote {out} (rotated by {method}, seed {seed}; loads with {load}); report: "
                                  f"{out / 'equivalence_report.md'}", highlight=False)
            return 0
        run_command(go)
