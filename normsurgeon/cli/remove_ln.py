"""The ``remove-ln`` command (added to ``normsurgeon.cli``'s app by ``register(app)``); a thin layer over
``normsurgeon.lnfree.run.remove_ln``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['remove-ln']
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli import training
from normsurgeon.cli.console import status
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import (AllowPickle, JsonOpt, ModelArg, OverwriteOpt, ProgressOpt, QuietOpt, TrustRemote,
                                     VerboseOpt, choice, device_option, prefer)


def register(app: typer.Typer) -> None:
    """Add ``remove-ln`` to ``app``."""

    @app.command("remove-ln", short_help="Remove every norm with fixed scales (or DyT) while fine-tuning.")
    def remove_ln_cmd(
        model: str = ModelArg,
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (written atomically at the end)."),
        data: Optional[str] = typer.Option(None, "--data", help="Text file, folder of text files, .jsonl, a saved "
                                           "`datasets` dataset, or package.module:function(split)."),
        finetune: bool = typer.Option(False, "--finetune", help="Remove the norms one by one while fine-tuning "
                                      "(default: calibrate the scales and remove them all, no training)."),
        to: str = choice("fixed", ("fixed", "dyt"), "--to", help="fixed: fixed-scale norms (folded away); dyt: Dynamic Tanh."),
        recipe: str = typer.Option("remove-ln-tiny", "--recipe", help="Schedule + training recipe: a built-in name "
                                   "(remove-ln-tiny, remove-ln-gpt2-small) or a YAML file."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (overrides the recipe)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (overrides the recipe)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per optimizer step, all processes."),
        micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help=training.MICRO_BATCH_HELP),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help=training.SEQ_LEN_HELP),
        block_size: Optional[int] = training.seq_len_old(),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (>=2-D weights)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the batch order."),
        checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints."),
        checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help=training.CHECKPOINT_DIR_HELP),
        keep_checkpoints: bool = training.keep_checkpoints_option(),
        resume: bool = typer.Option(False, "--resume", help=training.RESUME_HELP),
        control: bool = typer.Option(False, "--control", help="Also fine-tune a with-norm copy on the same data."),
        kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help="Weight of KL(original || current)."),
        uniform_scale_weight: Optional[float] = typer.Option(None, "--uniform-scale-weight",
                                                             help="Weight of the uniform-scale loss before the final norm."),
        split_qkv: bool = typer.Option(True, "--split-qkv/--no-split-qkv", help="Remove the attention norm of q/k and "
                                       "of v in separate steps (--no-split-qkv: one step)."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder, or `bytes`."),
        text_field: str = typer.Option("text", "--text-field", help="Field of JSONL rows / dataset column."),
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
        """Remove every LayerNorm/RMSNorm: fixed scalar scales (or DyT), staged during fine-tuning.

        Writes OUT (the stock class loads it: eps 1e12, gains x 1e6/sigma; float16 overflows, bfloat16 and
        float32 are fine), OUT/native (norms folded into their readers; normsurgeon.load), the report with
        held-out losses before / removed without fine-tuning / after (/ control), the loss curve and sigmas.
        Multi-process: accelerate launch -m normsurgeon.cli remove-ln ...

        \b
        Example:
          normsurgeon remove-ln examples/tiny-gpt2 --finetune --control \\
              --data examples.stdlib_corpus:load_stdlib_corpus \\
              -o out/tiny-gpt2-lnfree
        """

        def go() -> int:
            from normsurgeon.lnfree.report import to_markdown
            from normsurgeon.lnfree.run import RemoveLnOptions, remove_ln

            over = training.overrides(steps=steps, lr=lr, batch_size=batch_size, micro_batch_size=micro_batch_size,
                                      block_size=prefer(block_size, seq_len), weight_decay=weight_decay, seed=seed,
                                      checkpoint_every=checkpoint_every)
            opts = RemoveLnOptions(data=data, finetune=finetune, to=to, recipe=recipe, overrides=over,
                                   kl_weight=kl_weight, uniform_scale_weight=uniform_scale_weight, control=control,
                                   split_qkv=split_qkv, tokenizer=tokenizer, text_field=text_field,
                                   checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints, resume=resume,
                                   stop_after=stop_after, progress=False, overwrite=overwrite,
                                   allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            with training.training_run(device, progress and not as_json) as bar:
                report = remove_ln(model, out, opts, status=status(not as_json), progress=bar)
            return training.print_result(report, out, as_json, "remove-ln", ("lnfree_report.md",), to_markdown,
                                         drop=("train", "control_train"))
        run_command(go)
