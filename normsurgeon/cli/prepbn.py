"""The ``prepbn`` command (added to ``normsurgeon.cli``'s app by ``register(app)``); a thin layer over
``normsurgeon.prepbn.run.run_prepbn``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['prepbn']
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli import training
from normsurgeon.cli.console import status
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import (AllowPickle, JsonOpt, ModelArg, OverwriteOpt, ProgressOpt, QuietOpt, TrustRemote,
                                     VerboseOpt, device_option, prefer)


def register(app: typer.Typer) -> None:
    """Add ``prepbn`` to ``app``."""

    @app.command("prepbn", short_help="Replace the LayerNorms by RepBN while fine-tuning, then fold them away.")
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
        micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help=training.MICRO_BATCH_HELP),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Text: tokens per training window."),
        block_size: Optional[int] = training.seq_len_old(),
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
        checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help=training.CHECKPOINT_DIR_HELP),
        keep_checkpoints: bool = training.keep_checkpoints_option(),
        resume: bool = typer.Option(False, "--resume", help=training.RESUME_HELP),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Text: tokenizer folder, or `bytes`."),
        text_field: str = typer.Option("text", "--text-field", help="Text: field of JSONL rows / dataset column."),
        stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True),
        overwrite: bool = OverwriteOpt,
        device: str = device_option(),
        progress: bool = ProgressOpt,
        allow_pickle: bool = AllowPickle,
        trust_remote_code: bool = TrustRemote,
        as_json: bool = JsonOpt,
        quiet: bool = QuietOpt,
        verbose: bool = VerboseOpt,
    ) -> None:
        """Replace the LayerNorms of a Pre-LN transformer by RepBN (BN(x) + eta x) and fold them away.

        SLAB's progressive schedule: LayerNorm for a warm-up, then a LayerNorm/RepBN blend whose LayerNorm
        weight decays linearly to 0; then the BN statistics are recalibrated and every RepBN is folded
        (float64, cast once) into the linear layers that read it, so the written model computes no
        normalization statistics. Reports accuracy (image classifiers) or held-out loss (language models)
        before, after fine-tuning and after the fold, and the fold's numerical check.
        Multi-process: accelerate launch -m normsurgeon.cli prepbn ...

        \b
        Example:
          normsurgeon prepbn examples/tiny_vit/checkpoint --finetune \\
              --data examples.tiny_vit.vit:digits -o out/tiny-vit-prepbn
        """

        def go() -> int:
            from normsurgeon.prepbn.report import to_markdown
            from normsurgeon.prepbn.run import PRepBNOptions, run_prepbn

            over = training.overrides(steps=steps, lr=lr, batch_size=batch_size, micro_batch_size=micro_batch_size,
                                      block_size=prefer(block_size, seq_len), weight_decay=weight_decay, seed=seed,
                                      checkpoint_every=checkpoint_every)
            opts = PRepBNOptions(data=data, finetune=finetune, overrides=over, blend_warmup=blend_warmup,
                                 blend_steps=blend_steps, r0=r0, eta=eta, recalib_batches=recalib_batches,
                                 tokenizer=tokenizer, text_field=text_field, checkpoint_dir=checkpoint_dir,
                                 keep_checkpoints=keep_checkpoints, resume=resume, stop_after=stop_after,
                                 progress=False, overwrite=overwrite, allow_pickle=allow_pickle,
                                 trust_remote_code=trust_remote_code)
            with training.training_run(device, progress and not as_json) as bar:
                report = run_prepbn(model, out, opts, status=status(not as_json), progress=bar)
            return training.print_result(report, out, as_json, "prepbn", ("equivalence_report.md",), to_markdown)
        run_command(go)
