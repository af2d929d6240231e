"""The ``convert`` command: Pre-LN to Pre-RMSNorm / Pre-CRMSNorm, in memory (``normsurgeon.conversion``)
or streamed from disk (``normsurgeon.cli.streaming``).

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.callback.__name__ for c in app.registered_commands]
['convert']
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli.console import out_console, status
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import (EPILOG, MAX_LOGPROB_HELP, AllowPickle, JsonOpt, ModelArg, OverwriteOpt,
                                     ProgressOpt, QuietOpt, TrustRemote, VerboseOpt, choice, dtype_option)
from normsurgeon.cli.output import emit

TARGETS = ("rmsnorm", "crmsnorm")
BIAS_POLICIES = ("stock", "fold-all")
VERIFY_MODES = ("auto", "whole", "layerwise")


def register(app: typer.Typer) -> None:
    """Add ``convert`` to ``app``."""

    @app.command(epilog=EPILOG, short_help="Convert a Pre-LN model to Pre-RMSNorm or Pre-CRMSNorm exactly.")
    def convert(
        model: str = ModelArg,
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (must not exist unless --overwrite)."),
        to: str = choice("rmsnorm", TARGETS, "--to", help="rmsnorm: Pre-RMSNorm; crmsnorm: Pre-CRMSNorm (width d-1)."),
        recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipe file or built-in name (overrides --to)."),
        dtype: str = dtype_option(),
        bias_policy: Optional[str] = choice(None, BIAS_POLICIES, "--bias-policy",
                                            help="stock: keep shifts the stock class cannot hold on the norm (loads "
                                                 "in stock transformers); fold-all: create biases. Default: the "
                                                 "recipe's (stock)."),
        overwrite: bool = OverwriteOpt,
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify the written checkpoint."),
        text: Optional[Path] = typer.Option(None, "--text", help="Verify on this text file instead of built-in batches."),
        max_logprob_delta: Optional[float] = typer.Option(None, "--max-logprob-delta", min=0.0,
                                                         metavar="<float>", help=MAX_LOGPROB_HELP),
        max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 2GB."),
        json_out: bool = JsonOpt,
        allow_pickle: bool = AllowPickle,
        trust_remote_code: bool = TrustRemote,
        # --- streaming (normsurgeon/cli/streaming.py, issue 6) ---
        dry_run: bool = typer.Option(False, "--dry-run", help="Plan from config.json + safetensors headers only; write nothing."),
        stream: bool = typer.Option(False, "--stream", help="Convert group by group from disk (automatic when the "
                                                            "model does not fit in memory)."),
        max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Refuse (exit 6) a plan needing more, e.g. 4GiB."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted streaming conversion."),
        verify_mode: str = choice("auto", VERIFY_MODES, "--verify-mode", help="Streaming: how to verify (auto: whole "
                                  "model when it fits in memory, else layer by layer)."),
        progress: bool = ProgressOpt,
        quiet: bool = QuietOpt,
        verbose: bool = VerboseOpt,
    ) -> None:
        """Convert a Pre-LN model to Pre-RMSNorm or Pre-CRMSNorm exactly, write it, and verify it.

        The residual writers are centred, each LayerNorm's gain and shift move into the layers that read it,
        and the norms become RMSNorm with the same epsilon (Jiang et al. 2023). Math in float64, cast once.
        Post-LN and other structures that cannot be converted exactly are refused (exit 4), nothing written.

        \b
        Example:
          normsurgeon convert examples/tiny-gpt2 --to rmsnorm \\
              -o out/tiny-gpt2-rms
        """
        def go() -> int:
            from normsurgeon.cli import streaming as cs
            from normsurgeon.cli.progress import progress_for

            streams = dry_run or stream or resume or max_memory is not None or cs.should_stream(model)
            if streams:
                with progress_for(progress and not json_out) as bar:
                    return cs.run_streaming_convert(
                        model, out, to=to, recipe=recipe, bias_policy=bias_policy, dtype=dtype, overwrite=overwrite,
                        no_verify=not verify, max_shard_size=max_shard_size, max_memory=max_memory, resume=resume,
                        dry_run=dry_run, verify_mode=verify_mode, json_out=json_out, console=out_console,
                        status=status(not json_out), progress=bar, max_logprob_delta=max_logprob_delta,
                        streamed_for_memory=not (stream or resume or max_memory is not None))
            return convert_in_memory()

        def convert_in_memory() -> int:
            from normsurgeon.cli.progress import progress_for
            from normsurgeon.conversion import convert as do_convert
            from normsurgeon.verification.report import print_report

            with progress_for(progress and not json_out) as bar:
                report = do_convert(model, out, to=to, recipe=recipe, dtype=dtype, bias_policy=bias_policy,
                                    overwrite=overwrite, run_verify=verify, text_file=text,
                                    max_shard_size=max_shard_size, allow_pickle=allow_pickle,
                                    trust_remote_code=trust_remote_code, max_logprob_delta=max_logprob_delta,
                                    status=status(not json_out), progress=bar)
            if json_out:
                emit(report, "equivalence")
            else:
                print_report(report, out_console)
                for note in report["plan"]["notes"]:
                    out_console.print(f"note: {note}", highlight=False)
                for norm, why in report["plan"]["kept_on_norm"].items():
                    out_console.print(f"note: {norm} keeps its affine: {why}", highlight=False)
                load = "stock transformers or normsurgeon.load" if report["stock_loadable"] else "normsurgeon.load only"
                out_console.print(f"wrote {out} ({report['output']['format']}, {report['output']['dtype']}; "
                                  f"loads with {load}); report: {out / 'equivalence_report.md'}", highlight=False)
            return 0
        run_command(go)
