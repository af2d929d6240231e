"""Plan a streaming conversion from ``config.json`` and the safetensors headers only (no weights).

Steps: read the headers (and check the shard index), build the full model on ``meta`` (every name,
shape and tie) and a shallow probe (see ``skeleton.py``), map the probe's norms and plan the conversion
on it, generalise the probe's module names over all blocks (``expand.py``), then turn the plan into
*jobs*: one per module (or bare parameter) whose output tensors are computed together. Every checkpoint tensor must
be the source of some output or be dropped on purpose; anything else is an error.

>>> import tempfile, pathlib
>>> from normsurgeon.testing import tiny_gpt2
>>> d = pathlib.Path(tempfile.mkdtemp()); tiny_gpt2().save_pretrained(d)
>>> p = plan_streaming(d, "rmsnorm")
>>> [g.name for g in p.groups]
['embeddings', 'transformer.h.0', 'transformer.h.1', 'head']
>>> p.inventory["added"]
['lm_head.weight']
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch

from normsurgeon.errors import InputError, UnsupportedModel, UsageError
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.io.checkpoint import read_config
from normsurgeon.stream.expand import Expander, check_alike, expand_plan
from normsurgeon.stream.headers import CheckpointIndex, ShardReader, read_checkpoint_index
from normsurgeon.stream.skeleton import block_lists, checkpoint_renames, meta_model, probe_model, split_block
from normsurgeon.transforms.plan import Fold, RmsPlan, decide_fold, plan_rms_conversion

BASELINE_BYTES = 700 * 2**20  # interpreter + torch + transformers, measured on this project's machine
_NAMED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


@dataclasses.dataclass
class Output:
    """One output tensor: its name, where its values come from, and its final shape/dtype."""

    name: str
    source: str | None  # checkpoint tensor name, None when created (a new bias)
    role: str  # "weight" | "bias" | "norm_weight" | "norm_bias" | "param" | "copy"
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass
class Job:
    """A module (or bare parameter) processed as a unit: its output tensors and the ordered operations.

    ops (in the in-memory order): ("bake", norm), ("fold", norm, layout), ("center", layout),
    ("shrink_writer", layout), ("shrink_reader", layout), ("norm_reset",) for a folded norm.
    """

    name: str
    group: str
    outputs: list[Output]
    ops: list[tuple]

    @property
    def transformed(self) -> bool:
        return bool(self.ops)


@dataclasses.dataclass
class Group:
    name: str
    jobs: list[Job]
    read_bytes: int
    peak_bytes: int  # estimated working memory of the largest job in this group


@dataclasses.dataclass
class StreamPlan:
    """Everything the executor needs, derived from headers, config and a traced probe."""

    source: Path
    config: dict
    model_class: str
    target: str
    bias_policy: str
    out_dtype: torch.dtype
    rms_plan: RmsPlan  # full-size names, final decisions (or assumed non-zero shifts)
    groups: list[Group]
    inventory: dict
    assumed_nonzero_shifts: bool
    checkpoint: CheckpointIndex
    norm_biases: dict[str, str]  # norm name -> checkpoint name of its shift (for re-deciding folds)
    fold_facts: dict[str, dict]  # norm name -> readers, reads_output, missing, attrs
    norm_params: dict[str, dict]  # norm name -> {"weight": ckpt name | None, "bias": ckpt name | None, "eps"}
    model_dtype: torch.dtype  # the dtype from_pretrained would load the source in

    @property
    def jobs(self) -> list[Job]:
        return [j for g in self.groups for j in g.jobs]

    @property
    def outputs(self) -> list[Output]:
        return [o for j in self.jobs for o in j.outputs]

    @property
    def peak_bytes(self) -> int:
        """Estimated peak resident memory: the baseline, the largest job, and the pipeline around it."""
        return BASELINE_BYTES + max((g.peak_bytes for g in self.groups), default=0) + self.pipeline_bytes

    @property
    def prefetch_bytes(self) -> int:
        """How far the prefetcher reads ahead: the largest whole tensor read, at most ``PREFETCH_BYTES``
        (it always holds at least one tensor): about one job ahead, whatever the model's size."""
        reads = [self.checkpoint.tensors[o.source].nbytes for j in self.jobs if not row_chunked(j)
                 for o in j.outputs if o.source]
        return min(PREFETCH_BYTES, max(reads, default=0))

    @property
    def pipeline_bytes(self) -> int:
        """Tensors read ahead (at most one beyond ``prefetch_bytes``) and finished tensors waiting for the
        writer (``WRITE_DEPTH`` + 1 of the largest output)."""
        whole = [j for j in self.jobs if not row_chunked(j)]
        reads = [self.checkpoint.tensors[o.source].nbytes for j in whole for o in j.outputs if o.source]
        outs = [output_nbytes(o) for j in whole for o in j.outputs] + [CHUNK_BYTES // 2]
        return self.prefetch_bytes + max(reads, default=0) + (WRITE_DEPTH + 1) * max(outs)

    def fingerprint(self) -> str:
        """Changes when the source files, the options or the job list change (guards --resume)."""
        data = {"files": self.checkpoint.fingerprint(), "target": self.target, "policy": self.bias_policy,
                "dtype": str(self.out_dtype),
                "jobs": [(j.name, j.ops, [(o.name, o.source, o.shape) for o in j.outputs]) for j in self.jobs]}
        return hashlib.sha256(json.dumps(data, default=str).encode()).hexdigest()

    def to_dict(self) -> dict:
        """The plan as JSON-ready data (what ``--dry-run --json`` prints)."""
        return {
            "source": str(self.source), "architecture": self.model_class, "target": self.target,
            "bias_policy": self.bias_policy, "output_dtype": str(self.out_dtype).replace("torch.", ""),
            "checkpoint": {"files": [f.name for f in self.checkpoint.files], "tensors": len(self.checkpoint.tensors),
                           "bytes": self.checkpoint.total_bytes},
            "assumed_nonzero_shifts": self.assumed_nonzero_shifts,
            "inventory": self.inventory,
            "groups": [{"name": g.name, "jobs": len(g.jobs), "read_bytes": g.read_bytes, "peak_bytes": g.peak_bytes,
                        "tensors": {o.name: _describe(j, o) for j in g.jobs for o in j.outputs}} for g in self.groups],
            "memory": {"peak_bytes": self.peak_bytes, "baseline_bytes": BASELINE_BYTES,
                       "pipeline_bytes": self.pipeline_bytes,
                       "largest_group": max(self.groups, key=lambda g: g.peak_bytes).name if self.groups else None},
            "plan": {"untied": [r for r, _ in self.rms_plan.untie], "baked": [n for n, _ in self.rms_plan.bake],
                     "centred_writers": len(self.rms_plan.center),
                     "folded_norms": sum(f.fold_gain for f in self.rms_plan.folds),
                     "created_bias": sorted(set(self.rms_plan.created_bias)), "notes": self.rms_plan.notes},
        }


def output_nbytes(o: Output) -> int:
    """Bytes of one output tensor."""
    n = 1
    for d in o.shape:
        n *= d
    return n * torch.empty(0, dtype=o.dtype).element_size()


def _describe(job: Job, out: Output) -> str:
    if out.source is None:
        return "added: " + " + ".join(op[0] for op in job.ops)
    ops = [op[0] for op in job.ops if not (out.role in ("norm_weight", "norm_bias") and op[0] != "norm_reset")]
    verb = "transformed" if ops else "copied"
    src = "" if out.source == out.name else f" from {out.source}"
    return f"{verb}{src}" + (": " + " + ".join(ops) if ops else "")


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------

def source_dtype(config: dict, index: CheckpointIndex) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` loads: config's dtype, else the first float tensor's."""
    for key in ("dtype", "torch_dtype"):
        if isinstance(config.get(key), str) and config[key] in _NAMED_DTYPES:
            return _NAMED_DTYPES[config[key]]
    for t in index.tensors.values():
        if t.dtype.is_floating_point:
            return t.dtype
    raise InputError("the checkpoint holds no floating-point tensor")


def plan_streaming(source: str | Path, target: str = "rmsnorm", bias_policy: str = "stock",
                   dtype: torch.dtype | None = None, probe_layers: int = 2,
                   shifts: dict[str, bool] | None = None, read_shifts: bool = False) -> StreamPlan:
    """Plan the conversion of the safetensors folder ``source`` from its headers and config.

    Which norms fold their shift depends on whether the shift is zero. ``read_shifts=True`` reads the
    pre/final norm shifts from the checkpoint (a few KB) and decides on their values, as the conversion
    does; ``shifts`` (norm name -> non-zero) gives the answer directly; with neither every shift is
    assumed non-zero and no weight is read, as in ``--dry-run``.
    """
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"no such model folder: {source}")
    config = read_config(source)
    index = read_checkpoint_index(source)
    full = meta_model(config)
    probe = probe_model(config, probe_layers)
    nm = build_norm_map(probe)
    policy = "fold-all" if target == "crmsnorm" else bias_policy
    probe_plan = plan_rms_conversion(probe, nm, target, policy)
    if probe_plan.recentre:
        raise UnsupportedModel(f"embedding norms over several tables (`{probe_plan.recentre[0]}`) are centred by the "
                               "in-memory conversion only: run without --stream")
    if probe_plan.layer_scales:
        first = next(iter(probe_plan.layer_scales.values()))
        raise UnsupportedModel(f"layer scales ({len(probe_plan.layer_scales)} in the probe, e.g. `{first}`) are "
                               "folded by the in-memory conversion only: run without --stream")
    exp = Expander(block_lists(probe), block_lists(full))
    check_alike(probe_plan, exp)
    plan = expand_plan(probe_plan, exp)

    # Checkpoint names -> runtime names, and aliases of tied parameters.
    renames = checkpoint_renames(full, list(index.tensors))
    runtime_to_ckpt = {}
    for ckpt, rt in renames.items():
        if rt in runtime_to_ckpt:
            raise InputError(f"checkpoint tensors {runtime_to_ckpt[rt]} and {ckpt} both load into {rt}")
        runtime_to_ckpt[rt] = ckpt
    aliases: dict[int, list[str]] = {}
    for name, p in full.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    params = dict(full.named_parameters(remove_duplicate=False))
    state_names = list(full.state_dict().keys())

    def src_of(runtime: str) -> str:
        if runtime in runtime_to_ckpt:
            return runtime_to_ckpt[runtime]
        p = params.get(runtime)
        for alias in aliases.get(id(p), []) if p is not None else []:
            if alias in runtime_to_ckpt:
                return runtime_to_ckpt[alias]
        raise InputError(f"the checkpoint has no tensor for {runtime}")

    # Norm facts from the probe, generalised; decisions (re)made with the checkpoint's shifts.
    probe_norms = {n.name: n for n in nm.by_role("pre", "final")}
    fold_facts: dict[str, dict] = {}
    norm_biases: dict[str, str] = {}
    for pn, info in probe_norms.items():
        for fn in exp(pn):
            f = next(x for x in plan.folds if x.norm == fn)
            missing = [full_r for (full_r, _), r in zip(f.readers, info.readers) if not r.has_bias]
            fold_facts[fn] = {"readers": f.readers, "reads_output": info.reads_output, "missing": missing,
                              "attrs": {"weight_attr": f.weight_attr, "bias_attr": f.bias_attr,
                                        "gain_offset": f.gain_offset},
                              "keep": f.reason if info.keep_affine else None}
            if info.kind.has_bias and f"{fn}.{f.bias_attr}" in params:
                norm_biases[fn] = src_of(f"{fn}.{f.bias_attr}")
    model_dtype = source_dtype(config, index)
    if shifts is None and read_shifts:
        shifts = _read_shifts(norm_biases, index, model_dtype)
    assumed = shifts is None
    shifts = shifts or {n: n in norm_biases for n in fold_facts}
    folds, created, kept_shift, kept_gain = [], [], [], []
    for fn, facts in fold_facts.items():
        if facts["keep"]:  # a reader that is not linear: the affine stays on the norm, whatever the shift
            fold, made = Fold(fn, facts["readers"], False, False, facts["keep"], **facts["attrs"]), []
        else:
            fold, made = decide_fold(fn, facts["readers"], facts["reads_output"], shifts.get(fn, False),
                                     facts["missing"], policy, facts["attrs"])
        folds.append(fold)
        created.extend(made)
        if not fold.fold_gain:
            kept_gain.append(fn)
            if shifts.get(fn, False):
                kept_shift.append(fn)
    plan.folds, plan.created_bias, plan.kept_shift, plan.kept_gain = folds, created, kept_shift, kept_gain
    if plan.untie:
        extra = sum(params[f"{r}.weight"].numel() for r, _ in plan.untie)
        plan.notes.append(f"untied {', '.join(r for r, _ in plan.untie)} from the embedding: +{extra:,} parameters")

    norm_params = {}
    for fn, facts in fold_facts.items():
        a = facts["attrs"]
        norm_params[fn] = {k: src_of(f"{fn}.{a[k + '_attr']}") if f"{fn}.{a[k + '_attr']}" in params else None
                           for k in ("weight", "bias")}
        norm_params[fn]["eps"] = plan.replace[fn]
    eps_of = {n.name: n.kind.eps for n in nm.norms}
    modules = dict(full.named_modules())
    for pn, _ in probe_plan.bake:
        for fn in exp(pn):
            if type(modules[fn]) is not torch.nn.LayerNorm:
                raise UnsupportedModel(f"embedding norm {fn} is a {type(modules[fn]).__name__}: streaming bakes "
                                       "torch.nn.LayerNorm only; convert in memory")
            norm_params[fn] = {k: src_of(f"{fn}.{k}") if f"{fn}.{k}" in params else None for k in ("weight", "bias")}
            norm_params[fn]["eps"] = float(eps_of[pn])
    out_dtype = dtype or model_dtype
    jobs = _jobs(full, plan, state_names, src_of, index, renames, out_dtype)
    inventory = _inventory(jobs, index, renames, plan, full)
    groups = _groups(jobs, block_lists(full), state_names, index, out_dtype)
    return StreamPlan(source, config, type(full).__name__, target, policy, out_dtype, plan, groups, inventory,
                      assumed, index, norm_biases, fold_facts, norm_params, model_dtype)


def _read_shifts(norm_biases: dict[str, str], index: CheckpointIndex, model_dtype: torch.dtype) -> dict[str, bool]:
    """norm name -> its shift is non-zero, read in the dtype ``from_pretrained`` would load it in."""
    with ShardReader() as reader:
        return {n: bool(torch.any(reader.read(index.tensors[src]).to(model_dtype) != 0))
                for n, src in norm_biases.items()}


def _jobs(full, plan: RmsPlan, state_names, src_of, index, renames, out_dtype) -> list[Job]:
    crms = plan.target == "crmsnorm"
    shapes = {n: tuple(t.shape) for n, t in full.state_dict().items()}
    ops: dict[str, list[tuple]] = {}
    layouts: dict[str, str] = {}
    untied = dict(plan.untie)
    baked = {table: norm for norm, table in plan.bake}
    for table, norm in baked.items():
        ops.setdefault(table, []).append(("bake", norm))
    for f in plan.folds:
        if f.fold_gain:
            for r, lay in f.readers:
                ops.setdefault(r, []).append(("fold", f.norm, lay, f.fold_shift, f.gain_offset))
                layouts[r] = lay
    for name, kind in plan.center:
        ops.setdefault(name, []).append(("center", kind))
    if crms:
        for name, kind in plan.center:
            ops[name].append(("shrink_writer", kind))
        for f in plan.folds:
            for r, lay in f.readers:
                ops.setdefault(r, []).append(("shrink_reader", lay))
    norm_ops = {f.norm: f for f in plan.folds}
    dropped_norms = set(baked.values()) | (set(plan.replace) if crms else set())
    created = set(plan.created_bias)

    claimed: set[str] = set()
    jobs: list[Job] = []
    modules = dict(full.named_modules())
    for name in sorted(set(ops) | set(norm_ops) | dropped_norms, key=lambda n: _first_index(n, state_names)):
        if name in dropped_norms or name in norm_ops:
            mod = modules[name]
            f = norm_ops.get(name)
            w_attr, b_attr = (f.weight_attr, f.bias_attr) if f else ("weight", "bias")
            outs = []
            for attr, role, out_attr in ((w_attr, "norm_weight", "weight"), (b_attr, "norm_bias", "bias")):
                full_name = f"{name}.{attr}"
                if isinstance(getattr(mod, attr, None), torch.Tensor) and full_name in shapes:
                    claimed.add(full_name)
                    if name not in dropped_norms:
                        outs.append(Output(f"{name}.{out_attr}", src_of(full_name), role, shapes[full_name], out_dtype))
            reset = [("norm_reset", bool(f.fold_gain), bool(f.fold_shift), f.gain_offset)] if f and f.fold_gain else []
            jobs.append(Job(name, "", outs, reset))
            continue
        job_ops = ops[name]
        if name in shapes and name not in modules:  # a bare parameter writer
            shape = shapes[name][:-1] + (shapes[name][-1] - 1,) if crms else shapes[name]
            claimed.add(name)
            jobs.append(Job(name, "", [Output(name, src_of(name), "param", shape, out_dtype)], job_ops))
            continue
        mod = modules[name]
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if set(own) - {"weight", "bias"}:
            raise UnsupportedModel(f"{name} has parameters other than weight/bias ({own}): cannot stream it")
        w_name, b_name = f"{name}.weight", f"{name}.bias"
        w_src = src_of(untied[name] + ".weight") if name in untied else src_of(w_name)
        w_shape = _out_shape(shapes[w_name], job_ops)
        outs = [Output(w_name, w_src, "weight", w_shape, out_dtype)]
        claimed.add(w_name)
        has_bias = isinstance(getattr(mod, "bias", None), torch.Tensor)
        if has_bias or name in created:
            claimed.add(b_name)
            b_len = w_shape[1] if _layout_of(mod) == "conv1d" else w_shape[0]  # the output axis
            outs.append(Output(b_name, src_of(b_name) if has_bias else None, "bias", (b_len,), out_dtype))
        jobs.append(Job(name, "", outs, job_ops))
    for name in state_names:
        if name in claimed:
            continue
        src = src_of(name)
        t = index.tensors[src]
        dt = out_dtype if t.dtype.is_floating_point else t.dtype
        jobs.append(Job(name, "", [Output(name, src, "copy", shapes[name], dt)], []))
    return jobs


def _layout_of(mod: torch.nn.Module) -> str | None:
    from normsurgeon.graph.layouts import layout_of

    return layout_of(mod)


def _out_shape(shape: tuple[int, ...], ops: list[tuple]) -> tuple[int, ...]:
    s = list(shape)
    for op in ops:
        if op[0] == "shrink_writer":
            lay = op[1]
            if lay in ("linear", "conv"):
                s[0] -= 1
            elif lay == "param":
                s[-1] -= 1
            else:
                s[1] -= 1
        elif op[0] == "shrink_reader":
            if op[1] == "linear":
                s[1] -= 1
            else:
                s[0] -= 1
    return tuple(s)


def _first_index(module: str, state_names: list[str]) -> int:
    for i, n in enumerate(state_names):
        if n == module or n.startswith(module + "."):
            return i
    return len(state_names)


def _changes(job: Job, out: Output) -> bool:
    if out.role == "norm_weight":
        return any(op[0] == "norm_reset" and op[1] for op in job.ops)
    if out.role == "norm_bias":
        return any(op[0] == "norm_reset" and op[2] for op in job.ops)
    return bool(job.ops)


def _inventory(jobs: list[Job], index: CheckpointIndex, renames: dict[str, str], plan: RmsPlan, full) -> dict:
    own = {v: k for k, v in renames.items()}  # runtime name -> its own checkpoint tensor
    transformed, copied, added = [], [], []
    for j in jobs:
        for o in j.outputs:
            if o.source is None or own.get(o.name) != o.source:
                added.append(o.name)
            elif _changes(j, o):
                transformed.append(o.name)
            else:
                copied.append(o.name)
    used = {o.source for j in jobs for o in j.outputs if o.source is not None}
    dropped_ok = {f"{n}.{a}" for n in (set(plan.replace) if plan.target == "crmsnorm" else set()) |
                  {n for n, _ in plan.bake} for a in ("weight", "bias")}
    ignore = [re.compile(p) for p in (getattr(full, "_keys_to_ignore_on_load_unexpected", None) or [])]
    dropped, unaccounted = [], []
    for ckpt in index.tensors:
        if ckpt in used:
            continue
        rt = renames.get(ckpt, ckpt)
        if rt in dropped_ok or any(p.search(rt) for p in ignore):
            dropped.append(ckpt)
        else:
            unaccounted.append(ckpt)
    if unaccounted:
        raise InputError(f"{len(unaccounted)} checkpoint tensor(s) are not accounted for by the plan "
                         f"(e.g. {', '.join(sorted(unaccounted)[:3])}): the config does not describe these weights")
    return {"transformed": sorted(transformed), "copied": sorted(copied), "added": sorted(added),
            "dropped": sorted(dropped),
            "counts": {"transformed": len(transformed), "copied": len(copied), "added": len(added),
                       "dropped": len(dropped), "checkpoint": len(index.tensors)}}


def _groups(jobs: list[Job], lists: dict[str, int], state_names: list[str], index: CheckpointIndex,
            out_dtype: torch.dtype) -> list[Group]:
    first_block = next((i for i, n in enumerate(state_names) if split_block(n, lists)), len(state_names))
    order: list[str] = []
    by_group: dict[str, list[Job]] = {}
    for job in jobs:
        hit = split_block(job.name + ".", lists) or split_block(job.outputs[0].name if job.outputs else job.name, lists)
        if hit:
            g = f"{hit[0]}.{hit[1]}"
        else:
            g = "embeddings" if _first_index(job.name, state_names) < first_block else "head"
        job.group = g
        if g not in by_group:
            by_group[g] = []
            order.append(g)
        by_group[g].append(job)

    def rank(g: str) -> tuple:
        if g == "embeddings":
            return (0,)
        if g == "head":
            return (2,)
        lst, _, i = g.rpartition(".")
        return (1, _first_index(g, state_names) if lst else 0, int(i) if i.isdigit() else 0)

    groups = []
    for g in sorted(order, key=rank):
        js = by_group[g]
        read = sum(index.tensors[o.source].nbytes for j in js for o in j.outputs if o.source)
        groups.append(Group(g, js, read, max(_job_peak(j, index) for j in js)))
    return groups


CHUNK_BYTES = 16 * 2**20  # float64 working set of one row chunk
PREFETCH_BYTES = 512 * 2**20  # at most this much read ahead and not yet used (at least one tensor)
WRITE_DEPTH = 2  # finished tensors queued for the writer thread (plus the one being written)


def row_chunked(job: Job) -> bool:
    """Jobs whose weight is processed in row chunks: copies, and per-row centring (embedding, Conv1D)
    with its shrink. Each row's mean is reduced within the row, so chunks give identical bits."""
    if not job.outputs or job.outputs[0].role not in ("copy", "weight") or len(job.outputs[0].shape) < 2:
        return False
    return all(op[0] in ("center", "shrink_writer") and op[1] in ("embedding", "conv1d") for op in job.ops)


def _job_peak(job: Job, index: CheckpointIndex) -> int:
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


def check_budget(plan: StreamPlan, max_memory: int | None) -> None:
    """Refuse (ResourceError, exit 6) a plan whose estimated peak exceeds ``max_memory`` bytes."""
    from normsurgeon.errors import ResourceError

    if max_memory is not None and plan.peak_bytes > max_memory:
        g = max(plan.groups, key=lambda g: g.peak_bytes)
        raise ResourceError(f"the conversion needs about {plan.peak_bytes / 2**30:.2f} GiB (largest group {g.name}: "
                            f"{g.peak_bytes / 2**30:.2f} GiB + {BASELINE_BYTES / 2**30:.2f} GiB baseline + "
                            f"{plan.pipeline_bytes / 2**30:.2f} GiB read ahead / waiting to be written), above "
                            f"--max-memory {max_memory / 2**30:.2f} GiB")


def validate_options(target: str, bias_policy: str) -> None:
    if target not in ("rmsnorm", "crmsnorm"):
        raise UsageError(f"target must be rmsnorm or crmsnorm, not {target!r}")
    if bias_policy not in ("stock", "fold-all"):
        raise UsageError(f"bias policy must be stock or fold-all, not {bias_policy!r}")
