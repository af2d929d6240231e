"""Options every fine-tuning command shares (data, overrides, checkpoints, loading), as a base dataclass.

>>> from normsurgeon.lnfree.run import RemoveLnOptions
>>> RemoveLnOptions(data="corpus.txt", resume=True).resume
True
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class TrainingRunOptions:
    """The fields ``remove_ln`` and ``run_prepbn`` have in common; each command's options extend these."""

    data: str | None = None
    finetune: bool = False
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig fields
    tokenizer: str | None = None
    text_field: str = "text"
    checkpoint_dir: Path | None = None  # default: OUT.checkpoints
    keep_checkpoints: bool = False  # keep the training checkpoints after a successful run (default: removed)
    resume: bool = False
    stop_after: int | None = None  # stop after this many steps (leaves a resumable checkpoint)
    progress: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
