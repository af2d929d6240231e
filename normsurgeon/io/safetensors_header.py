"""Read and validate a safetensors header exactly as the safetensors library does, without the weights.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON (an object), then
one data buffer. The object maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the buffer), plus an optional ``"__metadata__"`` object of strings. Sorted by
offset, the tensors must tile the buffer exactly: the first begins at 0, each begins where the previous
ends, the last ends at the end of the file, and each spans ``numel * itemsize`` bytes. Every violation
is an ``InputError`` naming the file and the tensor, and nothing that is not a regular file is opened.

>>> import tempfile, pathlib, torch
>>> from safetensors.torch import save_file
>>> d = pathlib.Path(tempfile.mkdtemp()); save_file({"a": torch.ones(2, 3)}, str(d / "m.safetensors"))
>>> h = read_safetensors_header(d / "m.safetensors")
>>> h.tensors["a"].dtype, h.tensors["a"].shape, h.tensors["a"].begin, h.tensors["a"].end
('F32', (2, 3), 0, 24)
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
from pathlib import Path

import torch

from normsurgeon.errors import InputError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE
_U64 = 1 << 64

# Safetensors dtype code -> torch dtype. getattr: fp8 and the wide unsigned ints are missing in older torch.
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in (("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
                       ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                       ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
                       ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"))
    if hasattr(torch, name)
}


@dataclasses.dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; ``begin``/``end`` are relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    data_start: int  # absolute file offset of the data buffer (8 + N)
    tensors: dict[str, HeaderEntry]
    metadata: dict[str, str]


def regular_file_size(path: Path) -> int:
    """Size of ``path`` (symlinks followed); anything but a regular file is an InputError and never opened.

    >>> import tempfile, pathlib
    >>> try:
    ...     regular_file_size(pathlib.Path(tempfile.mkdtemp()))
    ... except InputError as e:
    ...     print(str(e).split(": ", 1)[1])
    not a regular file (a directory): refused
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{path.name} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise InputError(f"{path.name}: not a regular file ({kind}): refused")
    return st.st_size


def read_safetensors_header(file: Path) -> SafetensorsHeader:
    """Parse and validate ``file``'s header (see the module docstring); reads the first 8 + N bytes only."""
    size = regular_file_size(file)
    if size < 8:
        raise InputError(f"{file.name} is not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise InputError(f"{file.name} is not a safetensors file: header length {n} exceeds the file "
                                 f"({size} bytes) or the format's {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{file.name} cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{file.name} has a corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{file.name}: the safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # the library accepts null
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{file.name}: __metadata__ must be an object of strings")
    tensors = {name: _entry(file, name, info) for name, info in header.items()}
    end = _check_tiling(file, sorted(tensors.values(), key=lambda t: (t.begin, t.end)))
    if 8 + n + end != size:
        raise InputError(f"{file.name}: its tensors cover {end} data bytes but the file holds {size - 8 - n} "
                         "(truncated or padded)")
    return SafetensorsHeader(8 + n, tensors, metadata)


def _reject_constant(word: str):
    raise ValueError(f"{word} is not JSON")


def _is_u64(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _U64


def _entry(file: Path, name: str, info: object) -> HeaderEntry:
    where = f"{file.name}: tensor {name!r}"
    if not isinstance(info, dict):
        raise InputError(f"{where} is described by a JSON {type(info).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise InputError(f"{where} has no {key}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InputError(f"{where} has unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_u64(s) for s in shape):
        raise InputError(f"{where} has an invalid shape {shape!r} (a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise InputError(f"{where} has invalid data_offsets {offsets!r} (two non-negative integers)")
    numel = 1
    for s in shape:  # the library computes this in u64 and refuses an overflow, even when a later dim is 0
        numel *= s
        if numel >= _U64:
            raise InputError(f"{where} has a shape {shape} whose element count overflows 64 bits")
    nbytes = numel * DTYPES[dtype].itemsize
    begin, end = offsets
    if end < begin:
        raise InputError(f"{where} has data_offsets [{begin}, {end}] that end before they begin")
    if nbytes * 8 >= _U64 or end - begin != nbytes:  # the library counts bits in u64
        raise InputError(f"{where} spans {end - begin} bytes but {dtype} {shape} needs {nbytes}")
    return HeaderEntry(name, dtype, tuple(shape), begin, end)


def _check_tiling(file: Path, ordered: list[HeaderEntry]) -> int:
    """Sorted by offset, each tensor must begin where the previous ends (the first at 0); returns the end."""
    pos = 0
    for t in ordered:
        if t.begin != pos:
            problem = "overlaps the tensor before it" if t.begin < pos else "leaves a gap after the tensor before it"
            raise InputError(f"{file.name}: tensor {t.name!r} has data_offsets [{t.begin}, {t.end}] and "
                             f"{problem} (which ends at {pos}): tensors must be contiguous from 0")
        pos = t.end
    return pos
