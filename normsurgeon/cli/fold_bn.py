"""The ``fold-bn`` command (added to ``normsurgeon.cli``'s app by ``register(app)``); a thin layer over
``normsurgeon.batchnorm.run.run_fold_bn``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['fold-bn']
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli.console import out_console
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import (AllowPickle, JsonOpt, ModelArg, OverwriteOpt, QuietOpt, TrustRemote,
                                     VerboseOpt)
from normsurgeon.cli.output import emit

from normsurgeon.errors import UsageError


def _shape(text: Optional[str]) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise UsageError(f"cannot read --input-shape {text!r} (use e.g. 2,3,32,32)") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r} must list positive sizes")
    return shape


def register(app: typer.Typer) -> None:
    """Add ``fold-bn`` to ``app``."""

    @app.command("fold-bn", short_help="Fold every BatchNorm into the layer it is connected to, exactly.")
    def fold_bn(
        model: str = ModelArg,
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (written atomically)."),
        input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape for plain torch models, e.g. 2,3,32,32."),
        image_size: Optional[int] = typer.Option(None, "--image-size", help="Image size for HF vision models (default: config or 224)."),
        batch_size: int = typer.Option(2, "--batch-size", help="Number of random inputs used to trace and verify."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random verification inputs."),
        export: bool = typer.Option(True, "--export/--no-export", help="Write deploy/model.pt2 (torch.export)."),
        overwrite: bool = OverwriteOpt,
        dry_run: bool = typer.Option(False, "--dry-run", help="Fold and verify in memory; write nothing."),
        allow_pickle: bool = AllowPickle,
        trust_remote_code: bool = TrustRemote,
        as_json: bool = JsonOpt,
        quiet: bool = QuietOpt,
        verbose: bool = VerboseOpt,
    ) -> None:
        """Fold every eval-mode BatchNorm into the conv/linear the dataflow proves it is connected to.

        Also merges RepVGG branches and folds RepBN / Unified Normalization; writes the stock, deploy and
        torch.export forms and checks each against the source (docs/batchnorm.md).

        \b
        Example:
          normsurgeon fold-bn examples.tiny_cnn.model:pretrained \\
              --input-shape 8,1,8,8 -o out/tiny-cnn-folded
        """

        def go() -> int:
            from normsurgeon.batchnorm.run import run_fold_bn, units_markdown

            report = run_fold_bn(model, out, input_shape=_shape(input_shape), image_size=image_size,
                                 batch_size=batch_size, seed=seed, export=export, overwrite=overwrite,
                                 allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dry_run=dry_run)
            if as_json:
                emit(report, "equivalence")
                return 0
            _print(report, out_console, units_markdown)
            return 0

        run_command(go)


def _print(report: dict, console, units_markdown) -> None:
    from rich.table import Table

    c = report["batchnorm"]["counts"]
    table = Table(title=f"fold-bn: {report['status'].upper()}  (folded {c['folded']}, merged {c['merged']}, left {c['left']})")
    for col in ("unit", "kind", "action", "into / reason"):
        table.add_column(col)
    for e in report["batchnorm"]["units"]:
        table.add_row(e["name"], e["kind"], e["action"], e.get("into") or e.get("reason") or "")
    console.print(table)
    for form, m in report["fold_metrics"].items():
        console.print(f"{form}: max|Δ| {m['max_abs']:.3e}  (÷ output scale {m['rel_to_scale']:.3e}), "
                      f"top-1 {m['top1_agreement']:.4f}  {'ok' if m['ok'] else 'FAIL'}", highlight=False)
    exp = report.get("deploy_export")
    if exp:
        console.print(f"deploy export: {exp.get('file') or exp.get('error')}", highlight=False)
