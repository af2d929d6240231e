"""What the fine-tuning commands (``remove-ln``, ``prepbn``) share: their common options, the device
they train on, the progress of their runs, and how they print the result.

>>> sorted(TRAIN_OVERRIDES)[:3]
['batch_size', 'block_size', 'checkpoint_every']
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from normsurgeon.cli.console import err_console, out_console
from normsurgeon.cli.options import MicroBatchHelp, deprecated
from normsurgeon.cli.output import emit, show_report

TRAIN_OVERRIDES = ("steps", "lr", "batch_size", "micro_batch_size", "block_size", "weight_decay", "seed",
                   "checkpoint_every")
KEEP_CHECKPOINTS_HELP = "Keep OUT.checkpoints (or --checkpoint-dir) after a successful run (default: removed)."
CHECKPOINT_DIR_HELP = "Where training checkpoints go (default: OUT.checkpoints)."
RESUME_HELP = "Continue from the newest checkpoint."
MICRO_BATCH_HELP = MicroBatchHelp
SEQ_LEN_HELP = "Tokens per training window (overrides the recipe)."


def seq_len_old() -> Any:
    """The old spelling of ``--seq-len`` on the fine-tuning commands (the recipes' ``block_size``)."""
    return deprecated("--seq-len", "--block-size")


def overrides(**values: Any) -> dict:
    """The TrainConfig fields given on the command line (None: the recipe's)."""
    unknown = set(values) - set(TRAIN_OVERRIDES)
    assert not unknown, unknown
    return dict(values)


@contextlib.contextmanager
def training_run(device: str, enabled: bool) -> Iterator[Optional[Callable]]:
    """Accelerate placed on ``device`` and a progress reporter (None when disabled) for the block."""
    from normsurgeon.cli.device import accelerate_device
    from normsurgeon.cli.progress import progress_for

    with accelerate_device(device), progress_for(enabled) as bar:
        yield bar


def print_result(report: dict, out: Path, as_json: bool, kind: str, report_names: tuple[str, ...],
                 to_markdown: Callable[[dict], str], drop: tuple[str, ...] = ("train",)) -> int:
    """Print a fine-tuning command's result: the interrupted note, ``--json`` (training histories left out:
    they are in the report files) or the rendered report."""
    if report.get("rank"):
        return 0
    if report["status"] == "interrupted":
        if as_json:
            emit({"status": "interrupted", "step": report["step"], "checkpoint": report["checkpoint"]}, "interrupted")
        err_console.print(f"stopped at step {report['step']}; resume with --resume ({report['checkpoint']})",
                          highlight=False)
        return 0
    if as_json:
        slim = {k: v for k, v in report.items() if k not in drop}
        for k in drop:
            if k in report:
                v = report[k]
                slim[k] = {key: x for key, x in v.items() if key != "history"} if isinstance(v, dict) else v
        emit(slim, kind)
    else:
        show_report(out_console, out, report_names, to_markdown(report))
        out_console.print(f"wrote {out}", highlight=False)
    return 0


def keep_checkpoints_option() -> Any:
    return typer.Option(False, "--keep-checkpoints", help=KEEP_CHECKPOINTS_HELP)
