"""The output shards of a streaming conversion: byte layout fixed before any weight is read, writes at
planned offsets (``O_DIRECT`` where possible, see ``direct_writer.py``), and a background writer thread
so disk writes overlap the next tensor's read and math.

>>> from normsurgeon.stream.jobs import Output
>>> import torch
>>> [s.name for s in layout_shards([Output("w", "w", "copy", (2, 2), torch.float32)], 10**9, {})]
['model.safetensors']
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
from pathlib import Path
from typing import Callable

import torch

from normsurgeon.stream.direct_writer import BufferedFile, DirectFile, new_stage, open_direct
from normsurgeon.stream.headers import DTYPE_CODES
from normsurgeon.stream.budget import WRITE_DEPTH
from normsurgeon.stream.jobs import Output, output_nbytes


@dataclasses.dataclass
class ShardLayout:
    name: str
    header: bytes  # length prefix + JSON header, padded to 8 bytes
    offsets: dict[str, int]  # output name -> absolute offset
    size: int


def layout_shards(outputs: list[Output], max_shard_bytes: int, metadata: dict[str, str]) -> list[ShardLayout]:
    """Byte-limited shards in output order (same rule as ``io.writer.write_safetensors``)."""
    shards: list[list[Output]] = [[]]
    size = 0
    for o in outputs:
        nb = output_nbytes(o)
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += nb
    n = len(shards)
    layouts = []
    for i, group in enumerate(shards, 1):
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        # Larger itemsizes first keeps every tensor naturally aligned (as safetensors itself does).
        ordered = sorted(group, key=lambda o: -torch.empty(0, dtype=o.dtype).element_size())
        header: dict = {"__metadata__": {"format": "pt", **metadata}}
        pos = 0
        rel = {}
        for o in ordered:
            nb = output_nbytes(o)
            header[o.name] = {"dtype": DTYPE_CODES[o.dtype], "shape": list(o.shape), "data_offsets": [pos, pos + nb]}
            rel[o.name] = pos
            pos += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        head = len(raw).to_bytes(8, "little") + raw
        layouts.append(ShardLayout(name, head, {k: len(head) + v for k, v in rel.items()}, len(head) + pos))
    return layouts


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def open_shards(tmp: Path, layouts: list[ShardLayout], fresh: bool, direct: bool = True
                ) -> dict[str, DirectFile | BufferedFile]:
    """One writable file per shard, sized, with its header written when ``fresh``.

    ``direct``: write with ``O_DIRECT`` where the file system allows it (``direct_writer.py``).
    """
    files: dict[str, DirectFile | BufferedFile] = {}
    stage = new_stage() if direct else None  # one writer thread: one staging buffer for every shard
    for s in layouts:
        path = tmp / s.name
        f = open_direct(path, s.size, fresh, stage) if direct else None
        f = f or BufferedFile(path, s.size, fresh)
        if fresh:
            f.write(memoryview(s.header), 0)
        files[s.name] = f
    return files


class _BackgroundWriter:
    """Writes finished tensors on a second thread so disk writes overlap the next job's read and math.

    ``os.pwrite`` releases the GIL. At most ``depth`` items wait in the queue, which bounds the extra
    memory to ``depth`` output tensors (plus the one being written). ``call(fn)`` runs ``fn`` on the
    writer thread once every earlier write is done (how a group is marked finished without stalling the
    main thread). ``drain`` waits for everything queued and re-raises a failure.
    """

    def __init__(self, write: Callable[[str, torch.Tensor, int], None], depth: int = WRITE_DEPTH):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="normsurgeon-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    item[0](*item[1:])
            except BaseException as e:  # noqa: BLE001 - handed to the main thread in drain()
                self._error = e
            finally:
                self._queue.task_done()

    def submit(self, name: str, t: torch.Tensor, rel: int) -> None:
        if self._error is not None:
            self.drain()
        self._queue.put((self._write, name, t, rel))

    def call(self, fn: Callable[[], None]) -> None:
        if self._error is not None:
            self.drain()
        self._queue.put((fn,))

    def drain(self) -> None:
        self._queue.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
