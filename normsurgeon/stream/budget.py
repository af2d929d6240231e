"""How much memory running a job list takes, and the refusal when it is more than the user allows.

The estimate is the baseline (interpreter, torch, transformers), the largest job's working set, the
tensors read ahead and the finished tensors waiting for the writer (``StreamPlan.pipeline_bytes``).

>>> from normsurgeon.stream.jobs import Job, Output
>>> import torch
>>> row_chunked(Job("wte", "embeddings", [Output("wte.weight", "wte.weight", "weight", (50, 8), torch.float32)],
...                 [("center", "embedding")]))
True
"""
from __future__ import annotations

import torch

from normsurgeon.errors import ResourceError
from normsurgeon.stream.headers import CheckpointIndex
from normsurgeon.stream.jobs import Job

BASELINE_BYTES = 700 * 2**20  # interpreter + torch + transformers, measured on this project's machine
CHUNK_BYTES = 16 * 2**20  # float64 working set of one row chunk
PREFETCH_BYTES = 512 * 2**20  # at most this much read ahead and not yet used (at least one tensor)
WRITE_DEPTH = 2  # finished tensors queued for the writer thread (plus the one being written)


def row_chunked(job: Job) -> bool:
    """Jobs whose weight is processed in row chunks: copies, and per-row centring (embedding, Conv1D)
    with its shrink. Each row's mean is reduced within the row, so chunks give identical bits."""
    if not job.outputs or job.outputs[0].role not in ("copy", "weight") or len(job.outputs[0].shape) < 2:
        return False
    return all(op[0] in ("center", "shrink_writer") and op[1] in ("embedding", "conv1d") for op in job.ops)


def job_peak(job: Job, index: CheckpointIndex) -> int:
    """Working bytes of one job: per tensor, its source bytes + a float64 copy (+ one more for shrinking)
    + its output bytes; the tensors of a job are live together. Row-chunked jobs need one chunk."""
    if row_chunked(job):
        return 3 * CHUNK_BYTES + sum(index.tensors[o.source].nbytes for o in job.outputs[1:] if o.source) * 6
    total = 0
    for o in job.outputs:
        src = index.tensors[o.source].nbytes if o.source else 0
        numel = 1
        for s in o.shape:
            numel *= s
        out = numel * torch.empty(0, dtype=o.dtype).element_size()
        if job.ops:
            extra = 8 * numel if any(op[0].startswith("shrink") for op in job.ops) else 0
            total += max(src + 8 * numel, 8 * numel + extra + out)
        else:
            total += src + out
    return total


def check_budget(plan, max_memory: int | None) -> None:
    """Refuse (ResourceError, exit 6) a plan whose estimated peak exceeds ``max_memory`` bytes."""
    if max_memory is not None and plan.peak_bytes > max_memory:
        g = max(plan.groups, key=lambda g: g.peak_bytes)
        raise ResourceError(f"the conversion needs about {plan.peak_bytes / 2**30:.2f} GiB (largest group {g.name}: "
                            f"{g.peak_bytes / 2**30:.2f} GiB + {BASELINE_BYTES / 2**30:.2f} GiB baseline + "
                            f"{plan.pipeline_bytes / 2**30:.2f} GiB read ahead / waiting to be written), above "
                            f"--max-memory {max_memory / 2**30:.2f} GiB")
