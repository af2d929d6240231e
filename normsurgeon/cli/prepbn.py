"""The ``prepbn`` command (added to ``normsurgeon.cli``'s app by ``register(app)``); a thin layer over
``normsurgeon.prepbn.run.run_prepbn``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['prepbn']
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli.console import err_console, out_console, status
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import AllowPickle, ModelArg, OverwriteOpt, ReportJsonOpt, TrustRemote


def register(app: typer.Typer) -> None:
    """Add ``prepbn`` to ``app``."""

    @app.command("prepbn")
    def prepbn_cmd(
        model: str = ModelArg,
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (written atomically at the end)."),
        data: Optional[str] = typer.Option(None, "--data", help="Images: package.module:function(split) returning "
                                           "(pixel_values, labels), or a .npz (x_train, y_train, x_test, y_test). "
                                           "Text: a text file, folder, .jsonl, saved dataset, or factory."),
        finetune: bool = typer.Option(False, "--finetune", help="Fine-tune with the progressive LayerNorm -> RepBN "
                                      "blend (default: swap, recalibrate and fold without training)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (images: 300; text: 150)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (images: 5e-4; text: 1e-3)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images / windows per step, all processes."),
        micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Per forward pass per process."),
        block_size: Optional[int] = typer.Option(None, "--block-size", help="Text: tokens per window."),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (>=2-D weights)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the batch order."),
        blend_warmup: Optional[int] = typer.Option(None, "--blend-warmup", help="Steps of pure LayerNorm first "
                                                   "(default 10% of --steps)."),
        blend_steps: Optional[int] = typer.Option(None, "--blend-steps", help="T: steps of the linear decay of the "
                                                  "LayerNorm weight to 0 (default 60% of --steps)."),
        r0: float = typer.Option(1.0, "--r0", help="Blend weight at the first decay step (SLAB r0)."),
        eta: float = typer.Option(0.0, "--eta", help="Initial eta of RepBN(x) = BN(x) + eta x."),
        recalib_batches: int = typer.Option(20, "--recalib-batches", help="Training batches used to recalibrate "
                                            "the BN statistics before folding."),
        checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints."),
        checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Default: OUT.checkpoints."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Text: tokenizer folder, or `bytes`."),
        text_field: str = typer.Option("text", "--text-field", help="Text: field of JSONL rows / dataset column."),
        stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True),
        overwrite: bool = OverwriteOpt,
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (loss, blend weight) on stderr."),
        allow_pickle: bool = AllowPickle,
        trust_remote_code: bool = TrustRemote,
        as_json: bool = ReportJsonOpt,
    ) -> None:
        """Replace the LayerNorms of a Pre-LN transformer by RepBN (BN(x) + eta x) and fold them away.

        SLAB's progressive schedule: LayerNorm for a warm-up, then a LayerNorm/RepBN blend whose LayerNorm
        weight decays linearly to 0; then the BN statistics are recalibrated and every RepBN is folded
        (float64, cast once) into the linear layers that read it, so the written model computes no
        normalization statistics. Reports accuracy (image classifiers) or held-out loss (language models)
        before, after fine-tuning and after the fold, and the fold's numerical check.
        Multi-process: accelerate launch -m normsurgeon.cli prepbn ...

        Example: normsurgeon prepbn examples/tiny_vit/checkpoint --finetune --data examples.tiny_vit.vit:digits
        -o out/tiny-vit-prepbn
        """

        def go() -> int:
            from normsurgeon.prepbn.report import to_markdown
            from normsurgeon.prepbn.run import PRepBNOptions, run_prepbn

            overrides = {"steps": steps, "lr": lr, "batch_size": batch_size, "micro_batch_size": micro_batch_size,
                         "block_size": block_size, "weight_decay": weight_decay, "seed": seed,
                         "checkpoint_every": checkpoint_every}
            opts = PRepBNOptions(data=data, finetune=finetune, overrides=overrides, blend_warmup=blend_warmup,
                                 blend_steps=blend_steps, r0=r0, eta=eta, recalib_batches=recalib_batches,
                                 tokenizer=tokenizer, text_field=text_field, checkpoint_dir=checkpoint_dir,
                                 resume=resume, stop_after=stop_after, progress=progress and not as_json,
                                 overwrite=overwrite, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            report = run_prepbn(model, out, opts, status=status(not as_json))
            if report.get("rank"):
                return 0
            if report["status"] == "interrupted":
                err_console.print(f"stopped at step {report['step']}; resume with --resume ({report['checkpoint']})")
                return 0
            if as_json:
                slim = {k: v for k, v in report.items() if k != "train"}
                slim["train"] = {k: v for k, v in report["train"].items() if k != "history"}
                print(json.dumps(slim, indent=2, default=str))
            else:
                out_console.print(to_markdown(report), highlight=False, markup=False)
                out_console.print(f"wrote {out}", highlight=False)
            return 0
        run_command(go)
