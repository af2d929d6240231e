"""``fold_batchnorms``: fold every eval-mode BatchNorm that the dataflow proves foldable.

Two forms come out, both function-preserving:
- ``stock``: the source structure (stock ``transformers`` loads it). Folded BNs become exact identities
  ``y = x + shift``; the shift lives in the layer's bias, or in the BN's bias when the layer has none
  (HF ResNet convs have ``bias=False``). A group the stock structure cannot express stays as in the source.
- ``deploy``: folded BNs are ``nn.Identity``, merged branches ``ZeroBranch``, layers gain biases.
Math runs on a float64 copy; results are cast to the source dtypes once. The source model is not modified.

>>> import torch
>>> _ = torch.manual_seed(0)
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
>>> _ = m[1].running_var.uniform_(0.5, 2.0)
>>> r = fold_batchnorms(m, (torch.randn(1, 3, 8, 8),))
>>> [(e["name"], e["action"], e["into"]) for e in r.entries]
[('1', 'folded', '0')]
>>> type(r.deploy[1]).__name__
'Identity'
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from normsurgeon.batchnorm.apply import ZeroBranch, apply_fold, apply_merge, cast_back
from normsurgeon.module_tree import set_module
from normsurgeon.batchnorm.fold_math import F64
from normsurgeon.batchnorm.patterns import Fold, find_folds
from normsurgeon.batchnorm.rep import Merge, find_merges
from normsurgeon.batchnorm.stock import has_affine, identity_var, set_identity, settable
from normsurgeon.batchnorm.units import AffineMarker, AffineUnit, check_eval, find_units
from normsurgeon.graph.trace import trace_dataflow


@dataclasses.dataclass
class FoldResult:
    """Both output forms, the float64 deploy model (for the float64 check) and one report entry per unit."""

    stock: torch.nn.Module
    deploy: torch.nn.Module
    deploy64: torch.nn.Module
    entries: list[dict]
    structure: dict  # how to rebuild ``deploy`` from the source structure: identity / zero / bias_added

    @property
    def counts(self) -> dict[str, int]:
        out = {"folded": 0, "merged": 0, "left": 0}
        for e in self.entries:
            out[e["action"]] += 1
        return out


def copy_f64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 eval copy. ``train()`` then ``eval()`` drops caches some models keep in eval mode (LeViT's
    attention-bias cache would otherwise stay in the old dtype); tensors kept as plain attributes (not
    parameters or buffers: Wav2Vec2-Conformer's cached rotary table) are cast too, as ``.to`` skips them."""
    work = copy.deepcopy(model).to(F64)
    for mod in work.modules():
        for attr, v in list(vars(mod).items()):
            cast = _cast_floating(v, F64)
            if cast is not v:
                object.__setattr__(mod, attr, cast)
    work.train()
    return work.eval()


def _cast_floating(v, dtype):
    """``v`` with its floating tensors (also inside a tuple/list) in ``dtype``; ``v`` itself if none."""
    if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
        return v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v
    if isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v):
        out = [_cast_floating(x, dtype) for x in v]
        return v if all(a is b for a, b in zip(out, v)) else type(v)(out)
    return v


def _restore_plain_tensors(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Give ``dst``'s plain tensor attributes (caches filled by float64 runs) the source's values back,
    so that a form cast to the source dtypes never meets a float64 cache."""
    dst_mods = dict(dst.named_modules())
    for name, mod in src.named_modules():
        d = dst_mods.get(name)
        if d is None or type(d) is not type(mod):
            continue
        for attr, v in list(vars(d).items()):
            holds = isinstance(v, torch.Tensor) or isinstance(v, (tuple, list)) and any(
                isinstance(x, torch.Tensor) for x in v)
            if holds and not isinstance(v, torch.nn.Parameter) and attr in vars(mod):
                object.__setattr__(d, attr, copy.deepcopy(vars(mod)[attr]))


def _to64(obj):
    if isinstance(obj, torch.Tensor):
        return obj.to(F64) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to64(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to64(v) for v in obj)
    return obj


def plan(work: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, AffineUnit], list[Fold], dict, list[Merge]]:
    """Analyse units and trace ``work`` (float64, eval) with each affine unit as an opaque marker."""
    units = find_units(work, args, kwargs)
    originals = {}
    for name, u in units.items():
        if u.reason is None:
            originals[name] = work.get_submodule(name)
            set_module(work, name, AffineMarker(u.s, u.t, u.axis))
    try:
        graph = trace_dataflow(work, args, kwargs)
    finally:
        for name, mod in originals.items():
            set_module(work, name, mod)
    folds, left = find_folds(graph, units)
    merges = find_merges(graph, units, folds, left)
    return units, folds, left, merges


def fold_batchnorms(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> FoldResult:
    """Fold the BNs of ``model`` (eval mode) using one traced forward on ``args``/``kwargs``."""
    kwargs = kwargs or {}
    check_eval(model)
    dtypes = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    work = copy_f64(model)
    a64, k64 = _to64(args), _to64(kwargs)
    units, folds, left, merges = plan(work, a64, k64)
    merged_ids = {n for m in merges for n in m.identities}
    branch_convs = {n for m in merges for n in m.branches}

    deploy64 = work
    for f in folds:
        apply_fold(deploy64, f, units[f.unit])
    for m in merges:
        apply_merge(deploy64, m, units)
    structure = {"identity": [f.unit for f in folds], "zero": sorted(branch_convs | merged_ids),
                 "bias_added": sorted({f.layer for f in folds} | {m.main for m in merges}
                                      - {n for n, mod in model.named_modules() if getattr(mod, "bias", None) is not None}
                                      - branch_convs)}
    for name in structure["identity"]:
        set_module(deploy64, name, torch.nn.Identity())
    for name in structure["zero"]:
        set_module(deploy64, name, ZeroBranch())
    deploy = cast_back(copy.deepcopy(deploy64), dtypes).train().eval()  # train(): drop dtype caches
    _restore_plain_tensors(deploy, model)
    stock, stock_ok = _stock_form(model, deploy64, units, folds, merges, dtypes)
    entries = _entries(units, folds, left, merges, stock_ok)
    return FoldResult(stock, deploy, deploy64, entries, structure)


def _components(folds: list[Fold], merges: list[Merge]) -> list[set[str]]:
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            a = parent[a]
        return a

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for f in folds:
        union(f.unit, f.layer)
    for m in merges:
        for n in list(m.branches) + list(m.identities):
            union(m.main, n)
    groups: dict[str, set[str]] = {}
    for n in list(parent):
        groups.setdefault(find(n), set()).add(n)
    return list(groups.values())


def _stock_form(model, deploy64, units, folds, merges, dtypes) -> tuple[torch.nn.Module, set[str]]:
    """The source structure carrying the deploy weights, with folded BNs as exact identities."""
    stock = copy.deepcopy(model)
    src = dict(model.named_modules())
    carrier = {f.layer: f.unit for f in folds if f.direction == "producer"}
    branch = {n for m in merges for n in m.branches}
    ids = {n for m in merges for n in m.identities}
    ok_units: set[str] = set()
    for comp in _components(folds, merges):
        layers = [n for n in comp if n not in units]
        comp_units = [n for n in comp if n in units]
        dt = {n: dtypes.get(f"{n}.running_var", torch.float32) for n in comp_units}
        var = {n: identity_var(src[n], dt[n], units[n].in_shape) if settable(src[n]) else None for n in comp_units}
        if any(v is None for v in var.values()) or any(n in ids and not has_affine(src[n]) for n in comp_units):
            continue
        shift: dict[str, torch.Tensor] = {}
        ok = True
        for n in layers:
            has_bias = src[n].bias is not None
            if n in branch or has_bias:
                continue
            c = carrier.get(n)
            if c is None or not has_affine(src[c]):
                ok = False
                break
            shift[c] = deploy64.get_submodule(n).bias.detach()
        if not ok:
            continue
        with torch.no_grad():
            for n in layers:
                layer = stock.get_submodule(n)
                d = deploy64.get_submodule(n) if n not in branch else None
                layer.weight.copy_(d.weight if d is not None else torch.zeros_like(layer.weight))
                if layer.bias is not None:
                    layer.bias.copy_(d.bias if d is not None else torch.zeros_like(layer.bias))
            for n in comp_units:
                set_identity(stock.get_submodule(n), var[n], None if n not in shift else shift[n].to(dt[n]),
                             scale=0.0 if n in ids else 1.0)
        ok_units.update(comp_units)
    return stock, ok_units


def _entries(units, folds, left, merges, stock_ok) -> list[dict]:
    by_unit = {f.unit: f for f in folds}
    merged_into = {n: m.main for m in merges for n in m.identities}
    branch_of = {n: m.main for m in merges for n in m.branches}
    out = []
    for name, u in units.items():
        e = {"name": name, "kind": u.kind, "members": u.members, "axis": u.axis, "how": u.how or None}
        if name in by_unit:
            f = by_unit[name]
            e.update(action="folded", into=f.layer, direction=f"into the {'preceding' if f.direction == 'producer' else 'following'} {f.layout}")
            if f.layer in branch_of:
                e["direction"] += f", whose branch was merged into {branch_of[f.layer]!r}"
        elif name in merged_into:
            e.update(action="merged", into=merged_into[name], direction="identity branch merged into the parallel conv")
        else:
            e.update(action="left", into=None, reason=left.get(name, u.reason))
        if e["action"] != "left":
            e["stock"] = "exact identity" if name in stock_ok else "unchanged (the stock structure cannot hold the fold)"
        out.append(e)
    return out
