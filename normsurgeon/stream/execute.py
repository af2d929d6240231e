"""Run a ``StreamPlan``: one group at a time, one tensor read at a time, written straight into its shard.

The output layout (shards, headers, byte offsets) is fixed by the plan before any weight is read, so
each finished tensor is written with ``os.pwrite`` at its final offset and nothing accumulates in
memory: the peak is about the largest job (its source tensor, a float64 copy and the output).
Everything goes to ``.<out>.partial/`` beside the destination; ``progress.json`` there records the
finished groups, so ``resume=True`` redoes only the rest. The folder is renamed into place at the end:
a killed run leaves nothing at the destination.

The math is ``transforms.primitives`` on float64 tensors in the in-memory order, so every tensor is
bit-identical to ``normsurgeon.convert`` (tests/test_stream.py checks ``torch.equal`` per tensor).

>>> import tempfile, pathlib
>>> from normsurgeon.testing import tiny_gpt2
>>> d = pathlib.Path(tempfile.mkdtemp()); tiny_gpt2().save_pretrained(d / "src")
>>> r = stream_convert(d / "src", d / "out", verify="layerwise")
>>> r["status"], r["streaming"]["groups"]
('pass', 4)
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import resource
import threading
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml

from normsurgeon.errors import UsageError, VerificationFailed
from normsurgeon.io.writer import copy_tagalong_files, parse_size
from normsurgeon.stream.headers import DTYPE_CODES, TensorEntry, read_tensor
from normsurgeon.stream.plan import (CHUNK_BYTES, Job, Output, StreamPlan, check_budget, plan_streaming, row_chunked,
                                     validate_options)
from normsurgeon.transforms.primitives import (center_tensors, fold_affine_tensors, shrink_reader_tensor,
                                               shrink_writer_tensors)

PROGRESS = "progress.json"
F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Output layout
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ShardLayout:
    name: str
    header: bytes  # length prefix + JSON header, padded to 8 bytes
    offsets: dict[str, int]  # output name -> absolute offset
    size: int


def _nbytes(o: Output) -> int:
    n = 1
    for s in o.shape:
        n *= s
    return n * torch.empty(0, dtype=o.dtype).element_size()


def layout_shards(outputs: list[Output], max_shard_bytes: int, metadata: dict[str, str]) -> list[ShardLayout]:
    """Byte-limited shards in output order (same rule as ``io.writer.write_safetensors``)."""
    shards: list[list[Output]] = [[]]
    size = 0
    for o in outputs:
        nb = _nbytes(o)
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
            nb = _nbytes(o)
            header[o.name] = {"dtype": DTYPE_CODES[o.dtype], "shape": list(o.shape), "data_offsets": [pos, pos + nb]}
            rel[o.name] = pos
            pos += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        head = len(raw).to_bytes(8, "little") + raw
        layouts.append(ShardLayout(name, head, {k: len(head) + v for k, v in rel.items()}, len(head) + pos))
    return layouts


# ----------------------------------------------------------------------------------------------
# The math of one job
# ----------------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, plan: StreamPlan):
        self.plan = plan
        self.cache: dict[str, torch.Tensor] = {}  # small norm vectors, float64

    def raw(self, name: str) -> torch.Tensor:
        t = read_tensor(self.plan.checkpoint.tensors[name])
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
    if not job.ops or job.ops[0][0] == "norm_reset":
        reset = job.ops[0] if job.ops else ("norm_reset", False, False)
        res = {}
        for o in job.outputs:
            if o.role == "norm_weight" and reset[1]:
                res[o.name] = torch.ones(o.shape, dtype=F64).to(out_dt)
            elif o.role == "norm_bias" and reset[2]:
                res[o.name] = torch.zeros(o.shape, dtype=F64).to(out_dt)
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
            _, norm, layout, fold_shift = op
            p = plan.norm_params[norm]
            gain = reader.small(p["weight"])
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


def run_job_chunked(job: Job, plan: StreamPlan, reader: _Reader, write: Callable[[str, torch.Tensor, int], None]
                    ) -> None:
    """A row-chunked job (``plan.row_chunked``): read, transform and write ``rows`` rows at a time."""
    w_out = job.outputs[0]
    entry = plan.checkpoint.tensors[w_out.source]
    rows = entry.shape[0]
    row_in = entry.nbytes // rows
    cols = entry.numel // rows
    step = max(1, CHUNK_BYTES // (8 * cols))
    out_row = _nbytes(w_out) // rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        part = TensorEntry(entry.name, entry.file, entry.dtype, (r1 - r0,) + entry.shape[1:],
                           entry.start + r0 * row_in, (r1 - r0) * row_in)
        t = read_tensor(part)
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


def norm_shifts(plan: StreamPlan) -> dict[str, bool]:
    """Read every pre/final norm's shift (a few KB) and say which are non-zero."""
    reader = _Reader(plan)
    return {n: bool(torch.any(reader.f64(src) != 0)) for n, src in plan.norm_biases.items()}


# ----------------------------------------------------------------------------------------------
# Staging, progress and resume
# ----------------------------------------------------------------------------------------------

def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _open_shards(tmp: Path, layouts: list[ShardLayout], fresh: bool) -> dict[str, int]:
    fds = {}
    for s in layouts:
        path = tmp / s.name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fresh:
            os.ftruncate(fd, 0)
            os.pwrite(fd, s.header, 0)
            os.ftruncate(fd, s.size)
        fds[s.name] = fd
    return fds


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class _BackgroundWriter:
    """Writes finished tensors on a second thread so disk writes overlap the next job's read and math.

    ``os.pwrite`` releases the GIL. At most ``depth`` tensors wait in the queue, which bounds the extra
    memory to ``depth`` output tensors. ``drain`` waits for every queued write and re-raises a failure.
    """

    def __init__(self, write: Callable[[str, torch.Tensor, int], None], depth: int = 2):
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
                    self._write(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread in drain()
                self._error = e
            finally:
                self._queue.task_done()

    def submit(self, name: str, t: torch.Tensor, rel: int) -> None:
        if self._error is not None:
            self.drain()
        self._queue.put((name, t, rel))

    def drain(self) -> None:
        self._queue.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def execute_plan(plan: StreamPlan, tmp: Path, max_shard_bytes: int, metadata: dict[str, str], resume: bool,
                 status: Callable[[str], None] = lambda s: None,
                 on_group_done: Callable[[str], None] | None = None) -> dict:
    """Write every output tensor of ``plan`` into ``tmp``; skip groups ``progress.json`` lists as done."""
    layouts = layout_shards(plan.outputs, max_shard_bytes, metadata)
    where = {name: (s.name, off) for s in layouts for name, off in s.offsets.items()}
    fingerprint = plan.fingerprint()
    progress_path = tmp / PROGRESS
    done: list[str] = []
    if resume and progress_path.is_file():
        prog = json.loads(progress_path.read_text())
        if prog.get("fingerprint") == fingerprint and prog.get("max_shard_bytes") == max_shard_bytes:
            done = list(prog.get("done", []))
        else:
            status("the partial output is from a different plan: starting over")
    fresh = not done
    already = len(done)
    fds = _open_shards(tmp, layouts, fresh)
    reader = _Reader(plan)
    t_math = t_write = 0.0
    written = 0

    def write(name: str, t: torch.Tensor, rel: int) -> None:
        nonlocal written
        shard, off = where[name]
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        _pwrite_all(fds[shard], memoryview(data), off + rel)
        written += t.numel() * t.element_size()

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
            writer.drain()  # a group counts as done only once all its bytes are written
            done.append(group.name)
            _write_json_atomic(progress_path, {"fingerprint": fingerprint, "max_shard_bytes": max_shard_bytes,
                                               "done": done})
            if on_group_done is not None:
                on_group_done(group.name)
        writer.drain()
    finally:
        writer.close()
        for fd in fds.values():
            os.close(fd)
    if len(layouts) > 1:
        total = sum(_nbytes(o) for o in plan.outputs)
        index = {"metadata": {"total_size": total}, "weight_map": {k: v[0] for k, v in where.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"shards": [s.name for s in layouts], "bytes_written": written, "read_and_math_s": round(t_math, 3),
            "write_wait_s": round(t_write, 3), "resumed_groups": already}


# ----------------------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------------------

def stream_convert(source: str | Path, out: str | Path, *, to: str = "rmsnorm", bias_policy: str | None = None,
                   dtype: str | None = None, max_shard_size: str | int = "5GB", max_memory: str | int | None = None,
                   resume: bool = False, overwrite: bool = False, verify: str = "auto",
                   status: Callable[[str], None] = lambda s: None,
                   on_group_done: Callable[[str], None] | None = None) -> dict:
    """Convert the safetensors folder ``source`` group by group and write it to ``out``; return the report.

    ``verify``: "auto" (whole-model when both models fit in memory, else layer by layer), "whole",
    "layerwise" or "none". ``max_memory`` refuses (exit 6) a plan whose estimated peak is above it.
    """
    from normsurgeon.convert import _config_json, _versions, parse_dtype
    from normsurgeon.recipes import recipe_for_target
    from normsurgeon.verify.report import to_markdown, write_report

    t0 = time.perf_counter()
    source, out = Path(source), Path(out)
    rec = recipe_for_target(to)
    policy = bias_policy or rec.bias_policy
    validate_options(to, policy)
    if verify not in ("auto", "whole", "layerwise", "none"):
        raise UsageError(f"verify must be auto, whole, layerwise or none, not {verify!r}")
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; pass --overwrite to replace it")
    if out.resolve() == source.resolve():
        raise UsageError("the output folder is the input folder; inputs are never modified")
    budget = parse_size(max_memory) if max_memory is not None else None
    max_bytes = parse_size(max_shard_size)

    status("planning from config.json and the safetensors headers")
    draft = plan_streaming(source, to, policy, parse_dtype(dtype))
    check_budget(draft, budget)
    status("reading the norm shifts")
    plan = plan_streaming(source, to, policy, parse_dtype(dtype), shifts=norm_shifts(draft))
    check_budget(plan, budget)
    t_plan = time.perf_counter() - t0

    tmp = partial_folder(out)
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        stats = execute_plan(plan, tmp, max_bytes, {"normsurgeon_recipe": rec.name}, resume, status, on_group_done)
    except KeyboardInterrupt:
        status(f"interrupted: the partial output stays in {tmp}; run again with --resume to finish it")
        raise
    t_convert = time.perf_counter() - t0 - t_plan

    shim = _SourceShim(plan.config, plan.model_class)
    cfg = _config_json(shim, plan.rms_plan, rec, plan.out_dtype)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    copied = copy_tagalong_files(source, tmp)
    resolved = {"recipe": rec.model_dump(), "bias_policy": policy, "plan": plan.rms_plan.to_dict()}
    (tmp / "normsurgeon_recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    report: dict = {"status": "not-verified"}
    mode = verify
    if verify == "auto":
        mode = "whole" if _fits_whole(plan, budget) else "layerwise"
    if mode != "none":
        status(f"verifying ({mode})")
        report = _verify(source, tmp, mode, plan, rec)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.update({
        "tool": _versions(),
        "recipe": {"name": rec.name, "target": rec.target, "bias_policy": policy},
        "plan": plan.to_dict()["plan"] | {"kept_on_norm": {f.norm: f.reason for f in plan.rms_plan.folds
                                                            if not f.fold_gain}},
        "inventory": {**plan.inventory["counts"], "added": plan.inventory["added"],
                      "dropped": plan.inventory["dropped"], "shards": stats["shards"], "tagalong": copied},
        "stock_loadable": plan.rms_plan.stock_loadable,
        "streaming": {"groups": len(plan.groups), "resumed_groups": stats["resumed_groups"],
                      "estimated_peak_bytes": plan.peak_bytes, "peak_rss_bytes": peak,
                      "checkpoint_bytes": plan.checkpoint.total_bytes, "bytes_written": stats["bytes_written"],
                      "verify_mode": mode},
    })
    report.setdefault("source", {"ref": str(source)})
    report.setdefault("output", {})
    report["output"].update({"path": str(out), "dtype": str(plan.out_dtype).replace("torch.", ""),
                             "format": f"pre-{plan.target}"})
    report["timing_s"] = {**report.get("timing_s", {}), "plan": round(t_plan, 3), "convert": round(t_convert, 3),
                          "total": round(time.perf_counter() - t0, 3)}
    write_report(report, tmp)
    if report["status"] == "fail":
        shutil.rmtree(tmp, ignore_errors=True)
        raise VerificationFailed("the converted checkpoint is not equivalent to the source; nothing was "
                                 "written:\n" + to_markdown(report))
    (tmp / PROGRESS).unlink(missing_ok=True)
    _move_into_place(tmp, out)
    return report


@dataclasses.dataclass
class _SourceShim:
    """What ``convert._config_json`` reads from a loaded source, without loading it."""

    config: dict
    class_name: str
    kind: str = "folder"

    @property
    def model(self):
        return type(self.class_name, (), {})()


def _fits_whole(plan: StreamPlan, budget: int | None) -> bool:
    """Whole-model verification holds both models in float32 (or float64) plus activations."""
    numel = sum(t.numel for t in plan.checkpoint.tensors.values())
    item = 8 if plan.out_dtype == F64 else 4
    need = 2.5 * numel * item + (1 << 30)
    avail = budget if budget is not None else _available_memory()
    return need <= avail


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _verify(source: Path, tmp: Path, mode: str, plan: StreamPlan, rec) -> dict:
    if mode == "layerwise":
        from normsurgeon.stream.layerwise_verify import verify_layerwise

        return verify_layerwise(source, tmp, num=rec.verify.num_sequences, seq_len=rec.verify.seq_len,
                                seed=rec.verify.seed)
    from normsurgeon.io.loader import load_model
    from normsurgeon.verify.api import verify_loaded

    report = verify_loaded(load_model(str(source)), load_model(str(tmp)), num=rec.verify.num_sequences,
                           seq_len=rec.verify.seq_len, seed=rec.verify.seed)
    if plan.rms_plan.stock_loadable:
        stock = verify_loaded(load_model(str(source)), load_model(str(tmp), stock=True), num=rec.verify.num_sequences,
                              seq_len=rec.verify.seq_len, seed=rec.verify.seed)
        report["stock_load"] = {"status": stock["status"], "loaded_as": stock["output"]["loaded_as"],
                                "metrics": stock["metrics"]}
        if stock["status"] != "pass":
            report["status"] = "fail"
    return report


def _move_into_place(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
