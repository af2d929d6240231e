"""Run a ``StreamPlan``: one group at a time, one tensor read at a time, written straight into its shard.

The output layout (shards, headers, byte offsets) is fixed by the plan before any weight is read, so
each finished tensor is written at its final offset (``shards.py``) and nothing accumulates in
memory: the peak is about the largest job (its source tensor, a float64 copy and the output).
Everything goes to ``.<out>.partial/`` beside the destination; ``progress.json`` there records the
finished groups, so ``resume=True`` redoes only the rest. The folder is renamed into place at the end:
a killed run leaves nothing at the destination.

The math is ``transforms.primitives`` on float64 tensors in the in-memory order, so every tensor is
bit-identical to ``normsurgeon.conversion.convert`` (tests/test_stream.py checks ``torch.equal`` per tensor).

The entry point is ``pipeline.stream_convert``.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from normsurgeon.io.destination import sibling
from normsurgeon.stream.direct_writer import DirectFile
from normsurgeon.stream.headers import ShardReader, TensorEntry
from normsurgeon.stream.plan import CHUNK_BYTES, Job, Output, StreamPlan, row_chunked
from normsurgeon.stream.prefetch import Prefetcher
from normsurgeon.stream.shards import _BackgroundWriter, output_nbytes, _write_json_atomic, layout_shards, open_shards
from normsurgeon.transforms.primitives import (center_tensors, fold_affine_tensors, shrink_reader_tensor,
                                               shrink_writer_tensors)

PROGRESS = "progress.json"
F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# The math of one job
# ----------------------------------------------------------------------------------------------

class _Reader:
    """Checkpoint tensors by name, in the dtype ``from_pretrained`` would load them in; whole tensors come
    from the prefetcher when it has read them ahead."""

    def __init__(self, plan: StreamPlan, files: ShardReader, prefetch: Prefetcher | None = None):
        self.plan = plan
        self.files = files
        self.prefetch = prefetch
        self.cache: dict[str, torch.Tensor] = {}  # small norm vectors, float64

    def raw(self, name: str) -> torch.Tensor:
        entry = self.plan.checkpoint.tensors[name]
        t = self.prefetch.take(entry) if self.prefetch is not None else None
        if t is None:
            t = self.files.read(entry)
        # from_pretrained loads every float tensor in the model dtype; the in-memory path then upcasts.
        return t.to(self.plan.model_dtype) if t.dtype.is_floating_point else t

    def f64(self, name: str) -> torch.Tensor:
        return self.raw(name).to(F64)

    def small(self, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        if name not in self.cache:
            self.cache[name] = self.f64(name)
        return self.cache[name]


def run_job(job: Job, plan: StreamPlan, reader: _Reader) -> dict[str, torch.Tensor]:
    """The output tensors of one job, in the output dtype."""
    out_dt = plan.out_dtype
    if _copy_or_reset(job):
        res = {}
        for o in job.outputs:
            if _is_reset(job, o):  # a folded norm: unit gain (weight 1 - offset for (1+w) gains), zero shift
                value = 1.0 - job.ops[0][3] if o.role == "norm_weight" else 0.0
                res[o.name] = torch.full(o.shape, value, dtype=F64).to(out_dt)
            else:  # a copy: casting directly equals casting through float64 (the upcast is exact)
                res[o.name] = reader.raw(o.source).to(o.dtype)
        return res
    w_out = job.outputs[0]
    b_out = job.outputs[1] if len(job.outputs) > 1 else None
    w = reader.f64(w_out.source)
    b = reader.f64(b_out.source) if b_out is not None and b_out.source is not None else None
    for op in job.ops:
        kind = op[0]
        if kind == "bake":
            p = plan.norm_params[op[1]]
            w = F.layer_norm(w, (w.shape[-1],), reader.small(p["weight"]), reader.small(p["bias"]), p["eps"])
        elif kind == "fold":
            _, norm, layout, fold_shift, gain_offset = op
            p = plan.norm_params[norm]
            gain = reader.small(p["weight"])
            gain = gain + gain_offset if gain is not None and gain_offset else gain  # (1+w) gains
            shift = reader.small(p["bias"]) if fold_shift else None
            w, b, _ = fold_affine_tensors(w, b, layout, gain, shift, create_bias=fold_shift, inplace=True)
        elif kind == "center":
            center_tensors(w, b, op[1])
        elif kind == "shrink_writer":
            w, b = shrink_writer_tensors(w, b, op[1])
        elif kind == "shrink_reader":
            w = shrink_reader_tensor(w, op[1])
        else:  # pragma: no cover - plans only hold the kinds above
            raise ValueError(f"unknown op {kind}")
    res = {w_out.name: w.to(out_dt)}
    del w
    if b_out is not None:
        res[b_out.name] = b.to(out_dt)
    return res


def job_reads(job: Job, plan: StreamPlan) -> list[TensorEntry]:
    """The whole checkpoint tensors ``run_job`` reads for ``job``, in its order (norm vectors, read once
    and cached, and row-chunked jobs are left out)."""
    if row_chunked(job):
        return []
    if _copy_or_reset(job):
        names = [o.source for o in job.outputs if not _is_reset(job, o)]
    else:
        names = [o.source for o in job.outputs[:2]]
    return [plan.checkpoint.tensors[n] for n in names if n is not None]


def _copy_or_reset(job: Job) -> bool:
    """A job without math: copies, and a folded norm's reset parameters."""
    return not job.ops or job.ops[0][0] == "norm_reset"


def _is_reset(job: Job, o: Output) -> bool:
    """Whether output ``o`` of a copy/reset job is a folded norm's gain (set to 1) or shift (set to 0)."""
    reset = job.ops[0] if job.ops else ("norm_reset", False, False, 0.0)
    return (o.role == "norm_weight" and reset[1]) or (o.role == "norm_bias" and reset[2])


def run_job_chunked(job: Job, plan: StreamPlan, reader: _Reader, write: Callable[[str, torch.Tensor, int], None]
                    ) -> None:
    """A row-chunked job (``plan.row_chunked``): read, transform and write ``rows`` rows at a time."""
    w_out = job.outputs[0]
    entry = plan.checkpoint.tensors[w_out.source]
    rows = entry.shape[0]
    row_in = entry.nbytes // rows
    cols = entry.numel // rows
    step = max(1, CHUNK_BYTES // (8 * cols))
    out_row = output_nbytes(w_out) // rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        part = TensorEntry(entry.name, entry.file, entry.dtype, (r1 - r0,) + entry.shape[1:],
                           entry.start + r0 * row_in, (r1 - r0) * row_in)
        t = reader.files.read(part)
        if t.is_floating_point():
            t = t.to(plan.model_dtype)
        if job.ops:
            w = t.to(F64)
            del t
            for op in job.ops:
                if op[0] == "center":
                    center_tensors(w, None, op[1])
                else:
                    w, _ = shrink_writer_tensors(w, None, op[1])
            t = w.to(w_out.dtype)
            del w
        else:
            t = t.to(w_out.dtype)
        write(w_out.name, t, r0 * out_row)
    if len(job.outputs) > 1:  # the bias of a Conv1D writer: small, whole
        b_out = job.outputs[1]
        b = reader.f64(b_out.source)
        for op in job.ops:
            if op[0] == "center":
                b.sub_(b.mean())
            else:
                b = b[:-1].clone()
        write(b_out.name, b.to(b_out.dtype), 0)


# ----------------------------------------------------------------------------------------------
# Staging, progress and resume
# ----------------------------------------------------------------------------------------------

def partial_folder(out: Path) -> Path:
    """The resumable staging folder of a streaming conversion to ``out`` (one per destination, no pid)."""
    return sibling(out, "partial")


def execute_plan(plan: StreamPlan, tmp: Path, max_shard_bytes: int, metadata: dict[str, str], resume: bool,
                 status: Callable[[str], None] = lambda s: None,
                 on_group_done: Callable[[str], None] | None = None, direct: bool = True) -> dict:
    """Write every output tensor of ``plan`` into ``tmp``; skip groups ``progress.json`` lists as done.

    ``direct``: write the shards with ``O_DIRECT`` where the file system allows it.
    """
    layouts = layout_shards(plan.outputs, max_shard_bytes, metadata)
    where = {name: (s.name, off) for s in layouts for name, off in s.offsets.items()}
    fingerprint = plan.fingerprint()
    progress_path = tmp / PROGRESS
    done: list[str] = []
    if resume and progress_path.is_file():
        prog = json.loads(progress_path.read_text())
        missing = [s.name for s in layouts if not (tmp / s.name).is_file()]
        if prog.get("fingerprint") != fingerprint or prog.get("max_shard_bytes") != max_shard_bytes:
            status("the partial output is from a different plan: starting over")
        elif missing and prog.get("done"):
            status(f"the partial output lacks {missing[0]}: starting over")
        else:
            done = list(prog.get("done", []))
    fresh = not done
    already = len(done)
    shard_files = open_shards(tmp, layouts, fresh, direct)
    direct_used = all(isinstance(f, DirectFile) for f in shard_files.values())
    files = ShardReader()
    t_math = t_write = 0.0
    written = 0

    def write(name: str, t: torch.Tensor, rel: int) -> None:
        nonlocal written
        shard, off = where[name]
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        shard_files[shard].write(memoryview(data), off + rel)
        written += t.numel() * t.element_size()

    def finish_group(name: str) -> None:
        """On the writer thread, after the group's last write: a group counts as done only once all its
        bytes are in the files."""
        for f in shard_files.values():
            f.flush()
        done.append(name)
        _write_json_atomic(progress_path, {"fingerprint": fingerprint, "max_shard_bytes": max_shard_bytes,
                                           "done": done})
        if on_group_done is not None:
            on_group_done(name)

    todo = [g for g in plan.groups if g.name not in done]
    prefetch = Prefetcher([e for g in todo for j in g.jobs for e in job_reads(j, plan)], plan.prefetch_bytes)
    reader = _Reader(plan, files, prefetch)
    writer = _BackgroundWriter(write)
    try:
        _write_json_atomic(progress_path, {"fingerprint": fingerprint, "max_shard_bytes": max_shard_bytes,
                                           "done": done})
        for i, group in enumerate(plan.groups, 1):
            if group.name in done:
                continue
            status(f"group {i}/{len(plan.groups)}: {group.name}")
            for job in group.jobs:
                t0 = time.perf_counter()
                if row_chunked(job):
                    run_job_chunked(job, plan, reader, writer.submit)
                    continue
                tensors = run_job(job, plan, reader)
                t1 = time.perf_counter()
                for name, t in tensors.items():
                    writer.submit(name, t, 0)
                del tensors
                t_math += t1 - t0
                t_write += time.perf_counter() - t1
            writer.call(functools.partial(finish_group, group.name))
        writer.drain()
    finally:
        writer.close()
        prefetch.close()
        files.close()
        for f in shard_files.values():
            f.close()
    if len(layouts) > 1:
        total = sum(output_nbytes(o) for o in plan.outputs)
        index = {"metadata": {"total_size": total}, "weight_map": {k: v[0] for k, v in where.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"shards": [s.name for s in layouts], "bytes_written": written, "read_and_math_s": round(t_math, 3),
            "write_wait_s": round(t_write, 3), "resumed_groups": already, "direct_io": direct_used}


