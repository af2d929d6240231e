"""Write byte ranges of a file with ``O_DIRECT``: straight to the device, past the page cache.

Why: a streaming conversion writes as many bytes as it reads. Buffered writes first allocate page-cache
pages, which on some machines is the slowest step of the whole conversion (on this project's VM a
650 MB buffered write took 0.15-2.2 s depending on the kernel's state, the same write with
``O_DIRECT`` 0.32-0.41 s; see docs/benchmarks.md), and for checkpoints larger than memory they evict
the input's pages and throttle on dirty memory anyway.

``O_DIRECT`` needs file offsets, lengths and memory addresses aligned to the device's block size
(``ALIGN``, 4 KiB, covers 512-byte and 4 KiB devices). Tensors in a safetensors file are packed with no
gaps, so their boundaries are not aligned: each write is split into the aligned interior, copied through
an aligned staging buffer, and the two edge blocks it shares with its neighbours, which are kept in
memory until every byte of them has been written (a 4 KiB mask per block). ``flush`` also writes the
incomplete edge blocks (with whatever they hold so far) so that a group's bytes are on disk when it is
marked done; an edge block not in memory (after ``--resume``) is first read back from the file.

``open_direct`` returns None where ``O_DIRECT`` is unavailable (not Linux, tmpfs, some network file
systems); the caller then writes through the page cache.

>>> import tempfile, os, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "f.bin"
>>> f = open_direct(p, size=10_000, fresh=True)
>>> if f is None:  # no O_DIRECT here: nothing to show
...     f = BufferedFile(p, size=10_000, fresh=True)
>>> f.write(memoryview(b"b" * 5_000), 5_000); f.write(memoryview(b"a" * 5_000), 0); f.close()
>>> data = p.read_bytes(); len(data), data[:2], data[-2:]
(10000, b'aa', b'bb')
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

ALIGN = 4096
STAGE_BYTES = 8 * 2**20  # aligned staging buffer for the interior of a write


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is at ``offset`` (a write may be partial)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(f"write at {offset + done} wrote nothing")
        done += n


class BufferedFile:
    """The page-cache fallback with the same interface as ``DirectFile``."""

    def __init__(self, path: Path, size: int, fresh: bool):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides (0644 typically)
        self.size = size
        if fresh:
            os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, size)  # resuming a direct run: its last block may run past the end

    def write(self, data: memoryview, offset: int) -> None:
        pwrite_all(self.fd, data, offset)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        os.ftruncate(self.fd, self.size)
        os.close(self.fd)


class DirectFile:
    """A file of known ``size`` written in aligned blocks with ``O_DIRECT`` (see the module doc)."""

    def __init__(self, fd: int, size: int, fresh: bool, stage: mmap.mmap | None = None):
        self.fd, self.size = fd, size
        if fresh:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        self._own_stage = stage is None
        self.stage = stage if stage is not None else new_stage()  # used by one writing thread at a time
        self.edges: dict[int, tuple[mmap.mmap, bytearray]] = {}  # block start -> (4 KiB data, written mask)
        self.fresh = fresh

    def write(self, data: memoryview, offset: int) -> None:
        data = data.cast("B")
        end = offset + len(data)
        lo = -(-offset // ALIGN) * ALIGN  # first aligned offset inside the range
        hi = end // ALIGN * ALIGN  # last aligned offset inside the range
        if lo >= hi:  # the range lies inside one block, or straddles one boundary without a full block
            self._edge(data, offset, end)
            return
        if offset < lo:
            self._edge(data[:lo - offset], offset, lo)
        pos = lo
        stage = memoryview(self.stage)
        while pos < hi:
            n = min(len(self.stage), hi - pos)
            stage[:n] = data[pos - offset:pos - offset + n]
            pwrite_all(self.fd, stage[:n], pos)
            pos += n
        if hi < end:
            self._edge(data[hi - offset:], hi, end)

    def _edge(self, data: memoryview, start: int, end: int) -> None:
        """Bytes [start, end) of the file, within at most two blocks, into the in-memory edge blocks."""
        pos = start
        while pos < end:
            block = pos // ALIGN * ALIGN
            stop = min(end, block + ALIGN)
            buf, mask = self._block(block)
            buf[pos - block:stop - block] = data[pos - start:stop - start]
            mask[pos - block:stop - block] = b"\x01" * (stop - pos)
            if mask.count(0) == 0 or (block + ALIGN >= self.size and
                                      mask.count(0, 0, self.size - block) == 0):
                pwrite_all(self.fd, memoryview(buf), block)
                del self.edges[block]
            pos = stop

    def _block(self, block: int) -> tuple[mmap.mmap, bytearray]:
        if block not in self.edges:
            buf = mmap.mmap(-1, ALIGN)
            if not self.fresh:  # resuming: keep what an earlier run wrote to this block
                os.preadv(self.fd, [buf], block)
            self.edges[block] = (buf, bytearray(ALIGN))
        return self.edges[block]

    def flush(self) -> None:
        """Write every incomplete edge block as it stands (kept in memory: later writes complete it)."""
        for block, (buf, _) in sorted(self.edges.items()):
            pwrite_all(self.fd, memoryview(buf), block)

    def close(self) -> None:
        self.flush()
        os.ftruncate(self.fd, self.size)  # the last block may run past the end
        os.close(self.fd)
        if self._own_stage:
            self.stage.close()


def new_stage() -> mmap.mmap:
    """An aligned staging buffer (anonymous maps are page aligned); files written by one thread may share it."""
    return mmap.mmap(-1, STAGE_BYTES)


def open_direct(path: Path, size: int, fresh: bool, stage: mmap.mmap | None = None) -> DirectFile | None:
    """A ``DirectFile`` for ``path``, or None where ``O_DIRECT`` is not supported."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flag, 0o666)  # the umask decides
    except OSError:
        return None
    try:  # some file systems accept the flag at open and refuse the first aligned read or write
        block = mmap.mmap(-1, ALIGN)
        if not fresh:
            os.preadv(fd, [block], 0)
        os.pwrite(fd, block, 0)  # block 0 rewritten with what it holds (zeros when fresh)
    except OSError:
        os.close(fd)
        return None
    return DirectFile(fd, size, fresh, stage)
