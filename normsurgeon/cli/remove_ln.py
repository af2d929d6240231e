"""The ``remove-ln`` command (added to ``normsurgeon.cli``'s app by ``register(app)``); a thin layer over
``normsurgeon.lnfree.run.remove_ln``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['remove-ln']
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
    """Add ``remove-ln`` to ``app``."""

    @app.command("remove-ln")
    def remove_ln_cmd(
        model: str = ModelArg,
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (written atomically at the end)."),
        data: Optional[str] = typer.Option(None, "--data", help="Text file, folder of text files, .jsonl, a saved "
                                           "`datasets` dataset, or package.module:function(split)."),
        finetune: bool = typer.Option(False, "--finetune", help="Remove the norms one by one while fine-tuning "
                                      "(default: calibrate the scales and remove them all, no training)."),
        to: str = typer.Option("fixed", "--to", help="fixed: fixed-scale norms (folded away); dyt: Dynamic Tanh."),
        recipe: str = typer.Option("remove-ln-tiny", "--recipe", help="Schedule + training recipe: a built-in name "
                                   "(remove-ln-tiny, remove-ln-gpt2-small) or a YAML file."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (overrides the recipe)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (overrides the recipe)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per optimizer step, all processes."),
        micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Windows per forward pass per process."),
        block_size: Optional[int] = typer.Option(None, "--block-size", help="Tokens per window."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the batch order."),
        checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints."),
        checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Default: OUT.checkpoints."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint."),
        control: bool = typer.Option(False, "--control", help="Also fine-tune a with-norm copy on the same data."),
        kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help="Weight of KL(original || current)."),
        uniform_scale_weight: Optional[float] = typer.Option(None, "--uniform-scale-weight",
                                                             help="Weight of the uniform-scale loss before the final norm."),
        no_split_qkv: bool = typer.Option(False, "--no-split-qkv", help="Remove attention norms in one step."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder, or `bytes`."),
        text_field: str = typer.Option("text", "--text-field", help="Field of JSONL rows / dataset column."),
        stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True),
        overwrite: bool = OverwriteOpt,
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
        allow_pickle: bool = AllowPickle,
        trust_remote_code: bool = TrustRemote,
        as_json: bool = ReportJsonOpt,
    ) -> None:
        """Remove every LayerNorm/RMSNorm: fixed scalar scales (or DyT), staged during fine-tuning.

        Writes OUT (the stock class loads it: eps 1e12, gains x 1e6/sigma; float16 overflows, bfloat16 and
        float32 are fine), OUT/native (norms folded into their readers; normsurgeon.load), the report with
        held-out losses before / removed without fine-tuning / after (/ control), the loss curve and sigmas.
        Multi-process: accelerate launch -m normsurgeon.cli remove-ln ...

        Example: normsurgeon remove-ln examples/tiny-gpt2 --finetune --control --data
        examples.stdlib_corpus:load_stdlib_corpus -o out/tiny-gpt2-lnfree
        """

        def go() -> int:
            from normsurgeon.lnfree.run import RemoveLnOptions, remove_ln
            from normsurgeon.lnfree.report import to_markdown

            overrides = {"steps": steps, "lr": lr, "batch_size": batch_size, "micro_batch_size": micro_batch_size,
                         "block_size": block_size, "seed": seed, "checkpoint_every": checkpoint_every}
            opts = RemoveLnOptions(data=data, finetune=finetune, to=to, recipe=recipe, overrides=overrides,
                                   kl_weight=kl_weight, uniform_scale_weight=uniform_scale_weight, control=control,
                                   split_qkv=not no_split_qkv, tokenizer=tokenizer, text_field=text_field,
                                   checkpoint_dir=checkpoint_dir, resume=resume, stop_after=stop_after,
                                   progress=progress and not as_json, overwrite=overwrite,
                                   allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            report = remove_ln(model, out, opts, status=status(not as_json))
            if report.get("rank"):
                return 0
            if report["status"] == "interrupted":
                err_console.print(f"stopped at step {report['step']}; resume with --resume ({report['checkpoint']})")
                return 0
            if as_json:
                print(json.dumps({k: v for k, v in report.items() if k not in ("train", "control_train")} |
                                 {"train": {k: v for k, v in report["train"].items() if k != "history"}}, indent=2, default=str))
            else:
                out_console.print(to_markdown(report), highlight=False, markup=False)
                out_console.print(f"wrote {out}", highlight=False)
            return 0
        run_command(go)
