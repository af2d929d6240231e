"""Read the next jobs' tensors on a thread while the current job computes.

The executor knows every tensor it will read, in order (``execute.job_reads``). A ``Prefetcher`` reads
them ahead with its own file handles (``os.preadv`` releases the GIL), holding at most ``max_bytes`` of
tensors that are read but not yet taken (always at least one), so the read of job k+1 overlaps the
float64 math of job k. ``take(entry)`` returns the tensor when it was read ahead (waiting if that read
is under way) and None otherwise; the caller then reads it itself and the prefetcher skips it. A take
out of the expected order therefore never blocks on the budget.

>>> import tempfile, pathlib, torch
>>> from safetensors.torch import save_file
>>> from normsurgeon.stream.headers import read_checkpoint_index
>>> d = pathlib.Path(tempfile.mkdtemp()); save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(d / "m.safetensors"))
>>> idx = read_checkpoint_index(d)
>>> p = Prefetcher([idx.tensors["a"], idx.tensors["b"]], max_bytes=1 << 20)
>>> p.take(idx.tensors["a"]).tolist(), p.take(idx.tensors["b"]).tolist(), p.take(idx.tensors["a"])
([1.0, 1.0], [0.0, 0.0, 0.0], None)
>>> p.close()
"""
from __future__ import annotations

import threading

import torch

from normsurgeon.stream.headers import ShardReader, TensorEntry

_PENDING, _READING, _READY, _TAKEN = range(4)


class Prefetcher:
    """Reads ``entries`` in order on a background thread (see the module doc)."""

    def __init__(self, entries: list[TensorEntry], max_bytes: int):
        self._entries = entries
        self._state = [_PENDING] * len(entries)
        self._data: dict[int, torch.Tensor] = {}
        self._where: dict[tuple, list[int]] = {}  # entry key -> its indices, in order
        for i, e in enumerate(entries):
            self._where.setdefault(_key(e), []).append(i)
        self._max = max_bytes
        self._held = 0  # bytes read and not yet taken
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._files = ShardReader(own_maps=True)
        self._thread = threading.Thread(target=self._loop, name="normsurgeon-prefetch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            for i, e in enumerate(self._entries):
                with self._cond:
                    while (not self._stop and self._state[i] == _PENDING and self._held
                           and self._held + e.nbytes > self._max):
                        self._cond.wait()
                    if self._stop:
                        return
                    if self._state[i] != _PENDING:  # the taker read it itself
                        continue
                    self._state[i] = _READING
                t = self._files.read(e)
                with self._cond:
                    if self._stop:
                        return
                    self._data[i] = t
                    self._state[i] = _READY
                    self._held += e.nbytes
                    self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - the taker reads for itself and sees its own error
            with self._cond:
                self._error = err
                self._cond.notify_all()
        finally:
            self._files.close()

    def take(self, entry: TensorEntry) -> torch.Tensor | None:
        """The tensor if it was (or is being) read ahead, else None (the caller reads it)."""
        with self._cond:
            for i in self._where.get(_key(entry), []):
                state = self._state[i]
                if state == _TAKEN:
                    continue
                while self._state[i] == _READING and self._error is None:
                    self._cond.wait()
                if self._state[i] != _READY:  # not read ahead (or the read failed): the caller reads it
                    self._state[i] = _TAKEN
                    return None
                self._state[i] = _TAKEN
                self._held -= entry.nbytes
                self._cond.notify_all()
                return self._data.pop(i)
            return None

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._data.clear()
            self._cond.notify_all()
        self._thread.join()


def _key(e: TensorEntry) -> tuple:
    return (str(e.file), e.start, e.nbytes)
