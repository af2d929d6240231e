"""Where the executor's source tensors come from: safetensors shards on disk, or a model's state dict.

Both hand out tensors by their ``TensorEntry`` (``plan.checkpoint``), whole or by rows, in the dtype the
conversion starts from: a checkpoint's tensors in the dtype ``from_pretrained`` would load them in, a
model's tensors as they are. ``fresh`` says whether a tensor handed out is the caller's own memory (read
from disk) or the model's (which must never be modified in place).

>>> import torch
>>> src = StateDictSource({"w": torch.arange(6.0).reshape(3, 2)})
>>> from normsurgeon.stream.headers import TensorEntry
>>> src.rows(TensorEntry("w", None, torch.float32, (3, 2), 0, 24), 1, 3).tolist()
[[2.0, 3.0], [4.0, 5.0]]
"""
from __future__ import annotations

import torch

from normsurgeon.stream.headers import ShardReader, TensorEntry
from normsurgeon.stream.prefetch import Prefetcher


class CheckpointSource:
    """Tensors read from safetensors shards (``os.preadv``, no mmap), whole ones from the read-ahead thread
    when it has them."""

    fresh = True

    def __init__(self, model_dtype: torch.dtype, prefetch: Prefetcher | None = None):
        self.model_dtype = model_dtype
        self.files = ShardReader()
        self.prefetch = prefetch

    def _as_loaded(self, t: torch.Tensor) -> torch.Tensor:
        # from_pretrained loads every float tensor in the model dtype; the conversion starts from that.
        return t.to(self.model_dtype) if t.dtype.is_floating_point else t

    def read(self, entry: TensorEntry) -> torch.Tensor:
        t = self.prefetch.take(entry) if self.prefetch is not None else None
        return self._as_loaded(t if t is not None else self.files.read(entry))

    def rows(self, entry: TensorEntry, r0: int, r1: int) -> torch.Tensor:
        row = entry.nbytes // entry.shape[0]
        part = TensorEntry(entry.name, entry.file, entry.dtype, (r1 - r0,) + entry.shape[1:],
                           entry.start + r0 * row, (r1 - r0) * row)
        return self._as_loaded(self.files.read(part))

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        self.files.close()


class StateDictSource:
    """Tensors of a model in memory, by state-dict name (never copied, never modified)."""

    fresh = False

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def read(self, entry: TensorEntry) -> torch.Tensor:
        return self.tensors[entry.name].detach()

    def rows(self, entry: TensorEntry, r0: int, r1: int) -> torch.Tensor:
        return self.tensors[entry.name].detach()[r0:r1]

    def close(self) -> None:
        pass
