"""Safetensors headers without the weights: names, dtypes, shapes and byte offsets, plus the shard index check.

A safetensors file is ``u64 header length`` + a JSON header + one data buffer; each tensor's
``data_offsets`` are relative to the buffer. Reading only the header lets us plan a conversion, and the
offsets let us read one tensor with ``os.pread`` (no mmap, so no file pages count as our memory).

>>> import tempfile, pathlib, torch
>>> from safetensors.torch import save_file
>>> d = pathlib.Path(tempfile.mkdtemp()); save_file({"a": torch.ones(2, 3)}, str(d / "model.safetensors"))
>>> idx = read_checkpoint_index(d)
>>> idx.tensors["a"].shape, idx.tensors["a"].nbytes
((2, 3), 24)
>>> read_tensor(idx.tensors["a"]).sum().item()
6.0
"""
from __future__ import annotations

import dataclasses
import mmap
import os
from pathlib import Path

import torch

from normsurgeon.errors import InputError
from normsurgeon.io.checkpoint import SAFETENSORS_INDEX, read_shard_index
from normsurgeon.io.safetensors_header import DTYPES, read_safetensors_header

DTYPE_CODES = {v: k for k, v in DTYPES.items()}
_MAP_BYTES = 1 << 20  # tensors this large are read into their own anonymous memory map


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclasses.dataclass
class CheckpointIndex:
    """Every tensor of a safetensors checkpoint (one file or an indexed set of shards)."""

    folder: Path
    files: list[Path]
    tensors: dict[str, TensorEntry]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """(file name, size, mtime_ns) per file: changes when a shard is replaced."""
        return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header, validated as the safetensors library validates it (a truncated,
    overlapping or otherwise inconsistent file, or one that is not a regular file, is an InputError)."""
    header = read_safetensors_header(file)
    return {name: TensorEntry(name, file, DTYPES[t.dtype], t.shape, header.data_start + t.begin, t.end - t.begin)
            for name, t in header.tensors.items()}


def read_checkpoint_index(folder: Path) -> CheckpointIndex:
    """Headers of every shard, checked against ``model.safetensors.index.json`` before any weight is read."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if os.path.lexists(index):  # present but not a regular file: read_shard_index refuses it
        weight_map, files = read_shard_index(folder)
        tensors: dict[str, TensorEntry] = {}
        for f in files:
            entries = read_header(f)
            expected = {k for k, v in weight_map.items() if folder / v == f}
            if expected - set(entries):
                lack = sorted(expected - set(entries))
                raise InputError(f"{f.name} lacks {len(lack)} tensors the index puts there (e.g. {lack[0]})")
            extra = sorted(set(entries) - expected)
            if extra:
                raise InputError(f"{f.name} holds {len(extra)} tensors the index does not list (e.g. {extra[0]})")
            tensors.update(entries)
        return CheckpointIndex(folder, files, tensors)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} has no safetensors weights (streaming reads safetensors only)")
    tensors = {}
    for f in files:
        for k, e in read_header(f).items():
            if k in tensors:
                raise InputError(f"tensor {k} is in both {tensors[k].file.name} and {f.name}")
            tensors[k] = e
    return CheckpointIndex(folder, files, tensors)


class ShardReader:
    """Reads tensors with ``os.preadv`` into fresh memory (files are not mapped), keeping each file open.

    Use as a context manager; ``read_tensor`` is the one-shot form. ``own_maps``: read each tensor of
    1 MiB or more into its own anonymous memory map, unmapped when the tensor dies. For a reader on a
    second thread: a buffer malloc'ed there and freed on the main thread stays in that thread's malloc
    arena and inflates the resident set.
    """

    def __init__(self, own_maps: bool = False) -> None:
        self._fds: dict[Path, int] = {}
        self.own_maps = own_maps

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, entry: TensorEntry) -> torch.Tensor:
        fd = self._fds.get(entry.file)
        if fd is None:
            fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if self.own_maps and entry.nbytes >= _MAP_BYTES:
            buf = mmap.mmap(-1, entry.nbytes)
            raw = torch.frombuffer(buf, dtype=torch.uint8)
            view = memoryview(buf)
        else:
            raw = torch.empty(entry.nbytes, dtype=torch.uint8)  # not zero-filled: every byte is read below
            view = memoryview(raw.numpy())
        done = 0
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:]], entry.start + done)
            if n <= 0:
                raise InputError(f"{entry.file.name}: unexpected end of file reading {entry.name}")
            done += n
        return raw.view(entry.dtype).view(entry.shape)


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into fresh memory (see ``ShardReader``)."""
    with ShardReader() as reader:
        return reader.read(entry)
