"""Predictable resident memory for streaming work: fix glibc's mmap threshold.

glibc serves an allocation from its heap when it is below a *dynamic* threshold that rises (up to
32 MiB) each time a larger mapped block is freed. Streaming allocates and frees tensors of a few to tens
of MB in an interleaved order (one being computed, two waiting for the writer, one read ahead), so
after the first few the heap fragments and the resident set drifts upward: converting the same
OPT-1.3B-shaped checkpoint measured 0.77 to 2.42 GB peak across runs, against an estimate of 1.21 GB.
With the threshold fixed at 4 MiB every larger tensor is its own mapping, returned to the system when
freed: 0.74-0.75 GB over repeated runs, for about 15 % more time on that model (page faults).

``tune_malloc()`` sets it once per process (glibc only; elsewhere, or with ``NORMSURGEON_MALLOC_TUNING=0``
in the environment, it does nothing) and says whether it did. Call it before the work: set after
planning had already used the heap, the same conversion still peaked at 0.88-2.4 GB.

The streaming conversion calls it for checkpoints of ``TUNE_FROM_BYTES`` or more, the layer-by-layer
verifier always. Below that the drift is bounded by the small tensors (GPT-2 small, 498 MB: peaks of
0.49-0.62 GB over 7 runs, 1.0-1.3x the checkpoint) while the page faults would cost a fifth of the
conversion's time (about 0.25 s of 1 s, measured in ``benchmarks/bench_vs_transformer_lens.py``).

>>> isinstance(tune_malloc(), bool)
True
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 4 * 2**20
TUNE_FROM_BYTES = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_done: bool | None = None


def tune_malloc() -> bool:
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("NORMSURGEON_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # Both: a dynamic raise of the mmap threshold has also raised the trim threshold (to twice it).
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc: musl, macOS, Windows
        _done = False
    return _done
