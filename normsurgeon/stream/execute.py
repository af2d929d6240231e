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
from normsurgeon.stream.budget import row_chunked
from normsurgeon.stream import budget
from normsurgeon.stream.headers import TensorEntry
from normsurgeon.stream.jobs import Job, Output, output_nbytes
from normsurgeon.stream.plan import StreamPlan
from normsurgeon.stream.prefetch import Prefetcher
from normsurgeon.stream.shards import _BackgroundWriter, _write_json_atomic, layout_shards, open_shards
from normsurgeon.stream.sources import CheckpointSource, StateDictSource
from normsurgeon.transforms.primitives import (center_tensors, fold_affine_tensors, fold_scale_into_writer,
                                               shrink_reader_tensor, shrink_writer_tensors)

PROGRESS = "progress.json"
F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# The math of one job
# ----------------------------------------------------------------------------------------------

class _Reader:
    """Source tensors by name in the conversion's starting dtype, with the small norm vectors cached in
    float64; ``f64`` always returns the caller's own float64 tensor (ops work on it in place)."""

    def __init__(self, plan: StreamPlan, source: CheckpointSource | StateDictSource):
        self.plan = plan
        self.source = source
        self.cache: dict[str, torch.Tensor] = {}  # small norm vectors, float64

    def raw(self, name: str) -> torch.Tensor:
        return self.source.read(self.plan.checkpoint.tensors[name])

    def f64(self, name: str) -> torch.Tensor:
        t = self.raw(name)
        return t.to(F64, copy=not self.source.fresh)

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
            if job.ops and job.ops[0][0] == "fill":  # a folded layer scale: ones
                res[o.name] = torch.full(o.shape, job.ops[0][1], dtype=F64).to(out_dt)
            elif _is_reset(job, o):  # a folded norm: unit gain (weight 1 - offset for (1+w) gains), zero shift
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
            if p.get("module") is not None:  # in memory: the norm itself, in float64 (any norm class)
                with torch.no_grad():
                    w = p["module"](w)  # [vocab, d] -> [vocab, d]
            else:  # torch.nn.LayerNorm (checked when planning)
                w = F.layer_norm(w, (w.shape[-1],), reader.small(p["weight"]), reader.small(p["bias"]), p["eps"])
        elif kind == "fold":
            _, norm, layout, fold_shift, gain_offset = op
            p = plan.norm_params[norm]
            gain = reader.small(p["weight"])
            gain = gain + gain_offset if gain is not None and gain_offset else gain  # (1+w) gains
            shift = reader.small(p["bias"]) if fold_shift else None
            w, b, _ = fold_affine_tensors(w, b, layout, gain, shift, create_bias=fold_shift, inplace=True)
        elif kind == "scale":  # gamma * (W h + b) -> W' h + b' (graph/layer_scale.py); gamma := 1 elsewhere
            fold_scale_into_writer(w, b, op[2], reader.small(op[1]))
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
        if job.ops and job.ops[0][0] == "fill":
            return []
        names = [o.source for o in job.outputs if not _is_reset(job, o)]
    else:
        names = [o.source for o in job.outputs[:2]]
    return [plan.checkpoint.tensors[n] for n in names if n is not None]


def _copy_or_reset(job: Job) -> bool:
    """A job without math: copies, a folded norm's reset parameters, a folded layer scale's ones."""
    return not job.ops or job.ops[0][0] in ("norm_reset", "fill")


def _is_reset(job: Job, o: Output) -> bool:
    """Whether output ``o`` of a copy/reset job is a folded norm's gain (set to 1) or shift (set to 0)."""
    reset = job.ops[0] if job.ops and job.ops[0][0] == "norm_reset" else ("norm_reset", False, False, 0.0)
    return (o.role == "norm_weight" and reset[1]) or (o.role == "norm_bias" and reset[2])


def run_job_chunked(job: Job, plan: StreamPlan, reader: _Reader, write: Callable[[str, torch.Tensor, int], None]
                    ) -> None:
    """A row-chunked job (``plan.row_chunked``): read, transform and write ``rows`` rows at a time."""
    w_out = job.outputs[0]
    entry = plan.checkpoint.tensors[w_out.source]
    rows = entry.shape[0]
    cols = entry.numel // rows
    step = max(1, budget.CHUNK_BYTES // (8 * cols))
    out_row = output_nbytes(w_out) // rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        t = reader.source.rows(entry, r0, r1)
        if job.ops:
            w = t.to(F64, copy=not reader.source.fresh)
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
                 on_group_done: Callable[[str], None] | None = None, direct: bool = True,
                 tensors: dict[str, torch.Tensor] | None = None, progress: Callable[..., None] | None = None) -> dict:
    """Write every output tensor of ``plan`` into ``tmp``; skip groups ``progress.json`` lists as done.

    ``tensors``: the source state dict when the plan is of a model in memory (``plan_in_memory``); else
    the tensors are read from the checkpoint's shards. ``direct``: write the shards with ``O_DIRECT``
    where the file system allows it. ``progress("convert", bytes written, bytes to write, unit="B")`` is
    called from the writer thread after every write.
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
    t_math = t_write = 0.0
    written = 0

    def write(name: str, t: torch.Tensor, rel: int) -> None:
        nonlocal written
        shard, off = where[name]
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        shard_files[shard].write(memoryview(data), off + rel)
        written += t.numel() * t.element_size()
        if progress is not None:
            progress("convert", min(written, to_write), to_write, unit="B")

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
    to_write = sum(output_nbytes(o) for g in todo for j in g.jobs for o in (*j.outputs, *j.aliases))
    if progress is not None:
        progress("convert", 0, to_write, unit="B")
    if tensors is not None:
        source: CheckpointSource | StateDictSource = StateDictSource(tensors)
    else:
        source = CheckpointSource(plan.model_dtype, Prefetcher([e for g in todo for j in g.jobs
                                                                 for e in job_reads(j, plan)], plan.prefetch_bytes))
    reader = _Reader(plan, source)
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
                    run_job_chunked(job, plan, reader, _with_aliases(job, writer.submit))
                    continue
                tensors = run_job(job, plan, reader)
                t1 = time.perf_counter()
                for a in job.aliases:
                    tensors[a.name] = tensors[a.source]
                for name, t in tensors.items():
                    writer.submit(name, t, 0)
                del tensors
                t_math += t1 - t0
                t_write += time.perf_counter() - t1
            writer.call(functools.partial(finish_group, group.name))
        writer.drain()
    finally:
        writer.close()
        source.close()
        for f in shard_files.values():
            f.close()
    if len(layouts) > 1:
        total = sum(output_nbytes(o) for o in plan.outputs)
        index = {"metadata": {"total_size": total}, "weight_map": {k: v[0] for k, v in where.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"shards": [s.name for s in layouts], "bytes_written": written, "read_and_math_s": round(t_math, 3),
            "write_wait_s": round(t_write, 3), "resumed_groups": already, "direct_io": direct_used}




def run_to_state_dict(plan: StreamPlan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every output tensor of an in-memory plan, as a state dict (no files): what ``execute_plan`` would
    write, for callers that rebuild a module (``transforms.apply.apply_rms_plan``)."""
    reader = _Reader(plan, StateDictSource(tensors))
    out: dict[str, torch.Tensor] = {}
    for job in plan.jobs:
        if row_chunked(job):
            parts: dict[str, list[torch.Tensor]] = {}
            run_job_chunked(job, plan, reader, lambda name, t, rel: parts.setdefault(name, []).append(t))
            res = {name: torch.cat(ts) if len(ts) > 1 else ts[0] for name, ts in parts.items()}
        else:
            res = run_job(job, plan, reader)
        out.update(res)
        out.update({a.name: res[a.source] for a in job.aliases})
    return out


def _with_aliases(job: Job, write: Callable[[str, torch.Tensor, int], None]) -> Callable[[str, torch.Tensor, int], None]:
    """``write``, also writing each chunk of an output under its tied names."""
    if not job.aliases:
        return write

    def both(name: str, t: torch.Tensor, rel: int) -> None:
        write(name, t, rel)
        for a in job.aliases:
            if a.source == name:
                write(a.name, t, rel)

    return both
