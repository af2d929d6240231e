"""The job list of a conversion: which output tensors are computed together, from which source tensors,
by which ordered operations. One job per module (or bare parameter) that the plan touches, one copy job
per other tensor; jobs are grouped by block (embeddings, each block, head) for progress and resume.

The same jobs are built for a checkpoint on disk (``plan.plan_streaming``: names come from a ``meta``
model and the checkpoint's own names) and for a model in memory (``plan.plan_in_memory``: the state
dict's names); ``execute.py`` runs them over either source.

>>> o = Output("h.0.mlp.weight", "h.0.mlp.weight", "weight", (4, 3), torch.float32)
>>> output_nbytes(o)
48
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch

from normsurgeon.errors import InputError, UnsupportedModel
from normsurgeon.graph.layouts import layout_of
from normsurgeon.stream.headers import CheckpointIndex
from normsurgeon.stream.skeleton import split_block
from normsurgeon.transforms.plan import RmsPlan
from normsurgeon.transforms.steps import DEFAULT_STEPS, STEPS


@dataclasses.dataclass
class Output:
    """One output tensor: its name, where its values come from, and its final shape/dtype."""

    name: str
    source: str | None  # source tensor name, None when created (a new bias)
    role: str  # "weight" | "bias" | "norm_weight" | "norm_bias" | "param" | "copy" | "scale"
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass
class Job:
    """A module (or bare parameter) processed as a unit: its output tensors and the ordered operations.

    ops (in the order of the conversion's steps): ("bake", norm), ("fold", norm, layout, fold_shift,
    gain_offset), ("scale", source name of a layer scale, layout), ("center", layout),
    ("shrink_writer", layout), ("shrink_reader", layout); a job whose first op is ("norm_reset", gain,
    shift, gain_offset) (a folded norm) or ("fill", value) (a folded layer scale) computes no math.
    """

    name: str
    group: str
    outputs: list[Output]
    ops: list[tuple]
    # Tied names of an output (a tied lm_head of a centred embedding): written with the same values;
    # ``Output.source`` is the output's name.
    aliases: list[Output] = dataclasses.field(default_factory=list)

    @property
    def transformed(self) -> bool:
        return bool(self.ops)


@dataclasses.dataclass
class Group:
    name: str
    jobs: list[Job]
    read_bytes: int
    peak_bytes: int  # estimated working memory of the largest job in this group


def output_nbytes(o: Output) -> int:
    """Bytes of one output tensor."""
    n = 1
    for d in o.shape:
        n *= d
    return n * torch.empty(0, dtype=o.dtype).element_size()


def describe(job: Job, out: Output) -> str:
    """How one output tensor is made, in words (``--dry-run``)."""
    if out.source is None:
        return "added: " + " + ".join(op[0] for op in job.ops)
    ops = [op[0] for op in job.ops if not (out.role in ("norm_weight", "norm_bias") and op[0] != "norm_reset")]
    verb = "transformed" if ops else "copied"
    src = "" if out.source == out.name else f" from {out.source}"
    return f"{verb}{src}" + (": " + " + ".join(ops) if ops else "")


def check_steps(steps: list[str], target: str) -> set[str]:
    """The steps to run, as a set; refuse an order other than the standard one (the jobs apply the steps
    in that order: fold and centre commute, the others must come in it)."""
    known = [s for s in STEPS if s in steps]
    if known != [s for s in steps if s in STEPS]:
        raise UnsupportedModel(f"recipe steps {steps} are not in the standard order {list(STEPS)}")
    return set(steps)


def build_jobs(full: torch.nn.Module, plan: RmsPlan, state_names: list[str], src_of: Callable[[str], str],
               index: CheckpointIndex, out_dtype: torch.dtype, steps: set[str] | None = None) -> list[Job]:
    """One job per touched module / bare parameter, then one copy job per remaining state-dict tensor.

    ``full``: the model (real or on ``meta``) whose names, shapes and ties the output has; ``src_of``
    maps a runtime tensor name to its source tensor's name in ``index``.
    """
    steps = set(DEFAULT_STEPS[plan.target]) if steps is None else steps
    crms = "shrink_residual" in steps
    shapes = {n: tuple(t.shape) for n, t in full.state_dict().items()}
    ops: dict[str, list[tuple]] = {}
    untied = dict(plan.untie) if "untie_tied_readers" in steps else {}
    baked = {table: norm for norm, table in plan.bake} if "bake_embedding_norms" in steps else {}
    for table, norm in baked.items():
        ops.setdefault(table, []).append(("bake", norm))
    folding = "fold_norm_affine" in steps
    if folding:
        for f in plan.folds:
            if f.fold_gain:
                for r, lay in f.readers:
                    ops.setdefault(r, []).append(("fold", f.norm, lay, f.fold_shift, f.gain_offset))
    scales = plan.layer_scales if "center_writers" in steps else {}
    if "center_writers" in steps:
        for name, kind in plan.center:
            if name in scales:  # gamma * W(h): fold gamma into W first (graph/layer_scale.py), gamma := 1
                ops.setdefault(name, []).append(("scale", src_of(scales[name]), kind))
            ops.setdefault(name, []).append(("center", kind))
    if crms:
        for name, kind in plan.center:
            ops.setdefault(name, []).append(("shrink_writer", kind))
        for f in plan.folds:
            for r, lay in f.readers:
                ops.setdefault(r, []).append(("shrink_reader", lay))
    norm_ops = {f.norm: f for f in plan.folds} if folding else {}
    dropped_norms = set(baked.values()) | (set(plan.replace) if crms and "replace_norms" in steps else set())
    created = set(plan.created_bias) if folding else set()

    claimed: set[str] = set()
    jobs: list[Job] = []
    modules = dict(full.named_modules())
    for scale in scales.values():  # a folded layer scale: ones (d - 1 of them under CRMSNorm)
        shape = shapes[scale][:-1] + (shapes[scale][-1] - 1,) if crms else shapes[scale]
        claimed.add(scale)
        jobs.append(Job(scale, "", [Output(scale, src_of(scale), "scale", shape, out_dtype)], [("fill", 1.0)]))
    for name in sorted(set(ops) | set(norm_ops) | dropped_norms, key=lambda n: first_index(n, state_names)):
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
            raise UnsupportedModel(f"{name} has parameters other than weight/bias ({own}): the converter "
                                   "rewrites weight and bias only")
        w_name, b_name = f"{name}.weight", f"{name}.bias"
        w_src = src_of(untied[name] + ".weight") if name in untied else src_of(w_name)
        w_shape = out_shape(shapes[w_name], job_ops)
        outs = [Output(w_name, w_src, "weight", w_shape, out_dtype)]
        claimed.add(w_name)
        has_bias = isinstance(getattr(mod, "bias", None), torch.Tensor)
        if has_bias or name in created:
            claimed.add(b_name)
            b_len = w_shape[1] if layout_of(mod) == "conv1d" else w_shape[0]  # the output axis
            outs.append(Output(b_name, src_of(b_name) if has_bias else None, "bias", (b_len,), out_dtype))
        jobs.append(Job(name, "", outs, job_ops))
    jobs.sort(key=lambda j: first_index(j.name, state_names))
    ties: dict[int, list[str]] = {}
    all_params = dict(full.named_parameters(remove_duplicate=False))
    for n, t in all_params.items():
        ties.setdefault(id(t), []).append(n)
    by_output = {o.name: (j, o) for j in jobs for o in j.outputs}
    untied_names = {f"{r}.weight" for r in untied}  # untied from their writers: their own values
    swapped = set(plan.replace) if "replace_norms" in steps else set()
    swapped |= set(baked.values())
    for name in state_names:
        if name in claimed:
            continue
        if name.rpartition(".")[0] in swapped:  # another name of a swapped norm's tensor: the new module has none
            claimed.add(name)
            continue
        param = all_params.get(name)
        tied = [n for n in ties.get(id(param), []) if n != name and n in by_output and n not in untied_names] \
            if param is not None and name not in untied_names else []
        if tied:  # the same parameter as a computed output: the same values
            job, o = by_output[tied[0]]
            job.aliases.append(Output(name, o.name, "alias", o.shape, o.dtype))
            claimed.add(name)
            continue
        src = src_of(name)
        t = index.tensors[src]
        dt = out_dtype if t.dtype.is_floating_point else t.dtype
        jobs.append(Job(name, "", [Output(name, src, "copy", shapes[name], dt)], []))
    return jobs


def out_shape(shape: tuple[int, ...], ops: list[tuple]) -> tuple[int, ...]:
    """A writer's / reader's weight shape after its shrink ops (CRMSNorm: one residual coordinate less)."""
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


def first_index(module: str, state_names: list[str]) -> int:
    """Position of a module's first tensor in the state dict (the output order follows it)."""
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


def build_inventory(jobs: list[Job], index: CheckpointIndex, renames: dict[str, str], plan: RmsPlan,
                    full: torch.nn.Module) -> dict:
    """transformed / copied / added / dropped output names; every source tensor must be used or dropped on
    purpose (an InputError otherwise: the config does not describe the weights)."""
    own = {v: k for k, v in renames.items()}  # runtime name -> its own source tensor
    transformed, copied, added = [], [], []
    for j in jobs:
        for o in j.outputs:
            if o.source is None or own.get(o.name) != o.source:
                added.append(o.name)
            elif _changes(j, o):
                transformed.append(o.name)
            else:
                copied.append(o.name)
        for a in j.aliases:  # a tied name: its own source tensor, if it has one, is replaced
            (transformed if a.name in own and j.ops else copied if a.name in own else added).append(a.name)
    used = {o.source for j in jobs for o in j.outputs if o.source is not None}
    gone = (set(plan.replace) if plan.target == "crmsnorm" else set()) | {n for n, _ in plan.bake}  # modules
    dropped_ok = {f"{n}.{a}" for n in gone for a in ("weight", "bias")}
    ignore = [re.compile(p) for p in (getattr(full, "_keys_to_ignore_on_load_unexpected", None) or [])]
    dropped, unaccounted = [], []
    for src in index.tensors:
        if src in used:
            continue
        rt = renames.get(src, src)
        if rt in dropped_ok or rt.rpartition(".")[0] in gone or any(p.search(rt) for p in ignore):
            dropped.append(src)
        else:
            unaccounted.append(src)
    if unaccounted:
        raise InputError(f"{len(unaccounted)} checkpoint tensor(s) are not accounted for by the plan "
                         f"(e.g. {', '.join(sorted(unaccounted)[:3])}): the config does not describe these weights")
    return {"transformed": sorted(transformed), "copied": sorted(copied), "added": sorted(added),
            "dropped": sorted(dropped),
            "counts": {"transformed": len(transformed), "copied": len(copied), "added": len(added),
                       "dropped": len(dropped), "checkpoint": len(index.tensors)}}


def build_groups(jobs: list[Job], lists: dict[str, int], state_names: list[str], index: CheckpointIndex,
                 job_peak: Callable[[Job, CheckpointIndex], int]) -> list[Group]:
    """Jobs grouped by block: "embeddings" (before the first block), one group per block, "head"."""
    first_block = next((i for i, n in enumerate(state_names) if split_block(n, lists)), len(state_names))
    order: list[str] = []
    by_group: dict[str, list[Job]] = {}
    for job in jobs:
        hit = split_block(job.name + ".", lists) or split_block(job.outputs[0].name if job.outputs else job.name, lists)
        if hit:
            g = f"{hit[0]}.{hit[1]}"
        else:
            g = "embeddings" if first_index(job.name, state_names) < first_block else "head"
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
        return (1, first_index(g, state_names) if lst else 0, int(i) if i.isdigit() else 0)

    groups = []
    for g in sorted(order, key=rank):
        js = by_group[g]
        read = sum(index.tensors[o.source].nbytes for j in js for o in j.outputs if o.source)
        groups.append(Group(g, js, read, max(job_peak(j, index) for j in js)))
    return groups
