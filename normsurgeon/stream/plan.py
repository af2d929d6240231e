"""Plan a conversion as a job list (``jobs.py``), from a checkpoint on disk or from a model in memory.

``plan_streaming`` reads ``config.json`` and the safetensors headers only (no weights): it builds the
full model on ``meta`` (every name, shape and tie) and a shallow probe (see ``skeleton.py``), maps the
probe's norms and plans the conversion on it, and generalises the probe's module names over all blocks
(``expand.py``). ``plan_in_memory`` maps the norms of a loaded model itself. Both turn the conversion
plan into the same jobs, which ``execute.py`` runs over the matching tensor source (``sources.py``).
Every source tensor must be the source of some output or be dropped on purpose; anything else is an error.

>>> import tempfile, pathlib
>>> from normsurgeon.testing import tiny_gpt2
>>> d = pathlib.Path(tempfile.mkdtemp()); tiny_gpt2().save_pretrained(d)
>>> p = plan_streaming(d, "rmsnorm")
>>> [g.name for g in p.groups]
['embeddings', 'transformer.h.0', 'transformer.h.1', 'head']
>>> p.inventory["added"]
['lm_head.weight']
>>> plan_in_memory(tiny_gpt2(), "rmsnorm").inventory["added"]
['lm_head.weight']
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from normsurgeon.errors import InputError, UnsupportedModel, UsageError
from normsurgeon.graph.normmap import NormMap, build_norm_map
from normsurgeon.io.checkpoint import read_config
from normsurgeon.stream.budget import (BASELINE_BYTES, CHUNK_BYTES, PREFETCH_BYTES, WRITE_DEPTH, check_budget,
                                       job_peak, row_chunked)
from normsurgeon.stream.expand import Expander, check_alike, expand_plan
from normsurgeon.stream.headers import CheckpointIndex, ShardReader, TensorEntry, read_checkpoint_index
from normsurgeon.stream.jobs import (Group, Job, Output, build_groups, build_inventory, build_jobs, describe,
                                     output_nbytes)
from normsurgeon.stream.skeleton import block_lists, checkpoint_renames, meta_model, probe_model
from normsurgeon.transforms.plan import Fold, RmsPlan, decide_fold, plan_rms_conversion

__all__ = ["BASELINE_BYTES", "CHUNK_BYTES", "PREFETCH_BYTES", "WRITE_DEPTH", "Group", "Job", "Output",
           "StreamPlan", "check_budget", "output_nbytes", "plan_in_memory", "plan_streaming", "row_chunked",
           "source_dtype", "validate_options"]

_NAMED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


@dataclasses.dataclass
class StreamPlan:
    """Everything the executor needs: the jobs, where their tensors come from, and the conversion plan.

    ``checkpoint`` indexes the source tensors: safetensors entries on disk, or the state dict of a model
    in memory (entries without a file; ``sources.py``).
    """

    source: Path | None
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
    # (+ "module": a float64 copy of an embedding norm, which bakes its table exactly, in memory only)
    model_dtype: torch.dtype  # the dtype from_pretrained would load the source in

    @property
    def jobs(self) -> list[Job]:
        return [j for g in self.groups for j in g.jobs]

    @property
    def outputs(self) -> list[Output]:
        return [o for j in self.jobs for o in j.outputs + j.aliases]

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
                "jobs": [(j.name, j.ops, [(o.name, o.source, o.shape) for o in j.outputs + j.aliases])
                         for j in self.jobs]}
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
                        "tensors": {o.name: describe(j, o) for j in g.jobs for o in j.outputs}} for g in self.groups],
            "memory": {"peak_bytes": self.peak_bytes, "baseline_bytes": BASELINE_BYTES,
                       "pipeline_bytes": self.pipeline_bytes,
                       "largest_group": max(self.groups, key=lambda g: g.peak_bytes).name if self.groups else None},
            "plan": {"untied": [r for r, _ in self.rms_plan.untie], "baked": [n for n, _ in self.rms_plan.bake],
                     "centred_writers": len(self.rms_plan.center),
                     "folded_norms": sum(f.fold_gain for f in self.rms_plan.folds),
                     "created_bias": sorted(set(self.rms_plan.created_bias)), "notes": self.rms_plan.notes},
        }


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
                   shifts: dict[str, bool] | None = None, read_shifts: bool = False,
                   steps: list[str] | None = None) -> StreamPlan:
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
            bias_of = {full_r: r.has_bias for r in info.readers for full_r in exp(r.name)}
            missing = [full_r for full_r, _ in f.readers if not bias_of.get(full_r, True)]
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
        norm_params[fn]["eps"] = plan.replace.get(fn)
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
    from normsurgeon.stream.jobs import check_steps

    jobs = build_jobs(full, plan, state_names, src_of, index, out_dtype,
                      check_steps(steps, target) if steps is not None else None)
    inventory = build_inventory(jobs, index, renames, plan, full)
    groups = build_groups(jobs, block_lists(full), state_names, index, job_peak)
    return StreamPlan(source, config, type(full).__name__, target, policy, out_dtype, plan, groups, inventory,
                      assumed, index, norm_biases, fold_facts, norm_params, model_dtype)


def plan_in_memory(model: torch.nn.Module, target: str = "rmsnorm", bias_policy: str = "stock",
                   dtype: torch.dtype | None = None, steps: list[str] | None = None, norm_map: NormMap | None = None,
                   config: dict | None = None, source: Path | None = None, rms_plan: RmsPlan | None = None
                   ) -> StreamPlan:
    """Plan the conversion of a loaded ``model`` (any dtype, not modified) as jobs over its state dict.

    Its norms are mapped on the model itself (``norm_map`` if given), so nothing is assumed about its
    blocks; the plan's decisions use its actual norm shifts (``rms_plan``: a plan already made on it).
    ``steps``: the recipe's step list.
    """
    from normsurgeon.stream.jobs import check_steps
    from normsurgeon.transforms.steps import DEFAULT_STEPS

    policy = "fold-all" if target == "crmsnorm" else bias_policy
    if rms_plan is not None:
        plan, nm = rms_plan, norm_map
    else:
        nm = norm_map if norm_map is not None else build_norm_map(model)
        plan = plan_rms_conversion(model, nm, target, policy)
    state = model.state_dict()
    model_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    # Tied tensors are one source tensor under its first name (as a checkpoint stores them).
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for n, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else (n,)
        alias[n] = first.setdefault(key, n)
    entries = {n: TensorEntry(n, None, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
               for n, t in state.items() if alias[n] == n}
    index = CheckpointIndex(source, [], entries)

    def src_of(name: str) -> str:
        if name not in alias:
            raise InputError(f"the model has no tensor {name}")
        return alias[name]

    norm_params: dict[str, dict] = {}
    for f in plan.folds:
        norm_params[f.norm] = {k: alias.get(f"{f.norm}.{a}") for k, a in (("weight", f.weight_attr),
                                                                          ("bias", f.bias_attr))}
        norm_params[f.norm]["eps"] = plan.replace.get(f.norm)
    modules = dict(model.named_modules())
    eps_of = {n.name: n.kind.eps for n in nm.norms} if nm is not None else {}
    for norm, _ in plan.bake:
        norm_params[norm] = {k: alias.get(f"{norm}.{k}") for k in ("weight", "bias")}
        norm_params[norm]["eps"] = eps_of.get(norm, getattr(modules[norm], "eps", None))
        norm_params[norm]["module"] = copy.deepcopy(modules[norm]).to(torch.float64)  # a few KB
    out_dtype = dtype or model_dtype
    state_names = list(state)
    step_set = check_steps(steps, target) if steps is not None else set(DEFAULT_STEPS[target])
    jobs = build_jobs(model, plan, state_names, src_of, index, out_dtype, step_set)
    inventory = build_inventory(jobs, index, {n: n for n in entries}, plan, model)
    groups = build_groups(jobs, block_lists(model), state_names, index, job_peak)
    return StreamPlan(source, dict(config or {}), type(model).__name__, target, policy, out_dtype, plan, groups,
                      inventory, False, index, {}, {}, norm_params, model_dtype)


def _read_shifts(norm_biases: dict[str, str], index: CheckpointIndex, model_dtype: torch.dtype) -> dict[str, bool]:
    """norm name -> its shift is non-zero, read in the dtype ``from_pretrained`` would load it in."""
    with ShardReader() as reader:
        return {n: bool(torch.any(reader.read(index.tensors[src]).to(model_dtype) != 0))
                for n, src in norm_biases.items()}


def validate_options(target: str, bias_policy: str) -> None:
    if target not in ("rmsnorm", "crmsnorm"):
        raise UsageError(f"target must be rmsnorm or crmsnorm, not {target!r}")
    if bias_policy not in ("stock", "fold-all"):
        raise UsageError(f"bias policy must be stock or fold-all, not {bias_policy!r}")
