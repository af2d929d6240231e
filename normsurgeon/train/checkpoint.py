"""Training checkpoints: one file per kept step (``step-000050.pt``), written atomically, newest wins.

A checkpoint holds the model's full state dict (buffers included, e.g. a removal's scales and flags),
the optimizer, the loop's counters, the hooks' state and the loss history: everything a resumed run
needs to continue bit-for-bit. Loaded with ``weights_only=True``.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> p = save_checkpoint(d, 5, {"step": 5}, keep=2)
>>> latest_checkpoint(d).name, load_checkpoint(latest_checkpoint(d))["step"]
('step-000005.pt', 5)
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from normsurgeon.errors import InputError

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoints(folder: Path) -> list[Path]:
    """Kept checkpoints, oldest first."""
    if not Path(folder).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.pt"
    tmp = folder / f".{path.name}.partial-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise InputError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def discard_checkpoints(root: Path, used: list[str], whole: bool) -> list[str]:
    """After a successful run: remove the checkpoint folders ``root/<used>`` (``whole``: all of ``root``,
    the default ``OUT.checkpoints`` that only normsurgeon writes), then ``root`` itself when nothing else is
    left in it. Returns what was removed.

    >>> import tempfile, pathlib
    >>> r = pathlib.Path(tempfile.mkdtemp()) / "o.checkpoints"
    >>> _ = save_checkpoint(r / "removal", 1, {"step": 1}, keep=1)
    >>> discard_checkpoints(r, ["removal", "control"], whole=False), r.exists()
    (['removal'], False)
    """
    root = Path(root)
    if not root.is_dir() or root.is_symlink():
        return []
    removed = []
    targets = [p for p in root.iterdir()] if whole else [root / u for u in used]
    for p in targets:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif whole and p.exists():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    try:
        root.rmdir()  # only when empty: a --checkpoint-dir holding anything else stays
    except OSError:
        pass
    return removed


def checkpoint_note(root: Path, out: Path, keep: bool, used: list[str]) -> dict | None:
    """The report's ``checkpoints`` entry: kept or removed after success, the folder relative to the output
    (like every path in a report), or None when the run trained nothing.

    >>> checkpoint_note(Path("/x/o.checkpoints"), Path("/x/o"), True, ["removal"])["folder"]
    '../o.checkpoints'
    """
    if not used:
        return None
    where = os.path.relpath(os.path.abspath(root), os.path.abspath(out))
    return {"kept": bool(keep), "folder": where if keep else None, "subfolders": list(used)}


def checkpoints_line(report: dict) -> str | None:
    """The report line saying where a training run's checkpoints went (``report["checkpoints"]``), if any.

    >>> checkpoints_line({"checkpoints": {"kept": True, "folder": "out.checkpoints"}})
    '- training checkpoints: kept in `out.checkpoints`'
    """
    ck = report.get("checkpoints")
    if not ck:
        return None
    return (f"- training checkpoints: kept in `{ck['folder']}`" if ck.get("kept") else
            "- training checkpoints: removed after the run (`keep_checkpoints` keeps them)")
