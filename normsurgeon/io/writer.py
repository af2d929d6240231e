"""Write output folders atomically: a staging folder beside the destination, renamed into place only
when everything in it is complete.

>>> import tempfile, pathlib, torch
>>> out = pathlib.Path(tempfile.mkdtemp()) / "out"
>>> with staging_folder(out, overwrite=False) as tmp:
...     files = write_safetensors({"w": torch.zeros(2)}, tmp, max_shard_bytes=10**9)
>>> sorted(p.name for p in out.iterdir())
['model.safetensors']
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from normsurgeon.errors import UsageError
from normsurgeon.io.destination import claim_output

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx")
# Not carried from the source: what the output writes itself (its config, index, reports, settings) and the
# model card (README.md: ``io/model_card.py`` writes the output's own and keeps the source's below it).
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md",
               "equivalence_report.json", "equivalence_report.md", "normsurgeon_recipe.yaml",
               "lnfree_report.json", "lnfree_report.md", "placement_report.json", "placement_report.md",
               "sigmas.json", "loss_curve.png"}


@contextlib.contextmanager
def staging_folder(out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Claim ``out`` (``destination.claim_output``: path rules, lock) and yield an empty staging folder;
    on success it is moved to ``out``, on failure deleted."""
    with claim_output(out, inputs=inputs, overwrite=overwrite) as dest, dest.staging() as tmp:
        yield tmp


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000; ints pass through.

    >>> parse_size("2GB"), parse_size("1KiB"), parse_size(7)
    (2000000000, 1024, 7)
    """
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise UsageError(f"cannot read size {text!r} (use e.g. 5GB, 500MB, 2GiB)") from None


def unique_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; clone the second and later aliases."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        out[k] = v.clone() if key in seen else v.contiguous()
        seen.setdefault(key, k)
    return out


_OS_ERROR = re.compile(r"os error (\d+)")


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file``, with the library's I/O failures (a full disk, a read-only folder) raised as the
    OSError they are, so the caller reports them with the right exit code."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:  # safetensors raises its own error type around the OS error
        m = _OS_ERROR.search(str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def write_safetensors(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``state`` as one file, or as byte-limited shards plus ``model.safetensors.index.json``."""
    state = unique_storage({k: v.detach().cpu() for k, v in state.items()})
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        _save(shards[0], folder / "model.safetensors", meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, folder / name, meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def copy_tagalong_files(src: Path | None, dst: Path) -> list[str]:
    """Copy tokenizer, generation and other non-weight files from the source folder (not its README.md:
    ``normsurgeon.io.model_card.write_model_card`` writes the output's card and keeps the source's in it)."""
    if src is None or not src.is_dir():
        return []
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.name not in _NOT_COPIED \
                and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied
