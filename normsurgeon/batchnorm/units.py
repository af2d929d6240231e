"""Find every BatchNorm-like module and prove, by probing it in float64, that its inference form is a
per-channel affine map ``y = s*x + t`` along one axis of its input.

A "unit" is what folds as a whole: a BatchNorm (any ``_BatchNorm`` subclass), a duck-typed frozen BN
(buffers ``running_mean``/``running_var``, e.g. Hugging Face ``*FrozenBatchNorm2d``), a module with a
``running_var`` buffer (Unified Normalization), or a wrapper whose leaves are all BN-like (RepBN:
``BN(x) + alpha*x``). Formulas are never trusted alone: every ``(s, t)`` is checked against the module's
own forward on the traced input and on a random one.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval().double()
>>> units = find_units(m, (torch.randn(1, 3, 8, 8, dtype=torch.float64),), {})
>>> [(u.name, u.axis, u.reason) for u in units.values()]
[('1', 1, None)]
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from normsurgeon.batchnorm.fold_math import F64, bn_scale_shift
from normsurgeon.errors import UsageError

_PASSIVE = (torch.nn.Identity, torch.nn.Dropout)


@dataclasses.dataclass
class AffineUnit:
    """One BN-like unit. ``s``/``t`` are float64 ``[C]`` when ``reason`` is None (foldable form)."""

    name: str
    kind: str  # class name
    members: list[str]  # BN-like modules inside a wrapper (empty for a plain unit)
    calls: int = 0
    axis: int | None = None
    in_shape: tuple[int, ...] | None = None
    s: torch.Tensor | None = None
    t: torch.Tensor | None = None
    reason: str | None = None  # why it is not a per-channel affine map (then it is left in place)
    how: str = ""  # "formula" or "probe"


def is_bn_like(m: torch.nn.Module) -> bool:
    """A BatchNorm, a frozen BN or any leaf holding a ``running_var`` buffer."""
    if isinstance(m, _BatchNorm):
        return True
    has_children = next(iter(m.children()), None) is not None
    return not has_children and "running_var" in dict(m.named_buffers(recurse=False))


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)  # hold modules, are never called themselves


def _is_wrapper(m: torch.nn.Module) -> bool:
    leaves = [c for c in m.modules() if c is not m and next(iter(c.children()), None) is None]
    if not leaves or is_bn_like(m) or isinstance(m, _CONTAINERS):
        return False
    return any(is_bn_like(c) for c in leaves) and all(is_bn_like(c) or isinstance(c, _PASSIVE) for c in leaves)


def candidates(model: torch.nn.Module) -> dict[str, list[str]]:
    """Outermost BN units: ``{unit name: [member BN names]}``; every BN-like module is in exactly one."""
    out: dict[str, list[str]] = {}
    taken: set[str] = set()
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in taken):
            continue
        if _is_wrapper(m):
            out[name] = [f"{name}.{n}" for n, c in m.named_modules() if n and is_bn_like(c)]
            taken.add(name)
        elif is_bn_like(m):
            out[name] = []
            taken.add(name)
    return out


def check_eval(model: torch.nn.Module) -> None:
    """Refuse a model with a BatchNorm in training mode (its output would use batch statistics)."""
    bad = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]
    if bad:
        raise UsageError(f"{len(bad)} BatchNorm module(s) are in training mode (first: {bad[0]!r}); fold-bn "
                         "folds eval-mode BatchNorms only: call model.eval() first")


def _numel_c(m: torch.nn.Module) -> int | None:
    for key in ("running_var", "running_mean", "weight", "bias"):
        v = getattr(m, key, None)
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            return v.numel()
    sizes = [p.numel() for p in m.parameters() if p.dim() == 1 and p.numel() > 1]
    sizes += [b.numel() for b in m.buffers() if b.dim() == 1 and b.numel() > 1]
    return max(sizes) if sizes else None


def _bcast(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _fits(m: torch.nn.Module, xs: list[torch.Tensor], s: torch.Tensor, t: torch.Tensor, axis: int) -> bool:
    with torch.no_grad():
        for x in xs:
            y = m(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return False
            pred = x * _bcast(s, x.dim(), axis) + _bcast(t, x.dim(), axis)
            if not torch.isfinite(y).all() or (y - pred).abs().max() > 1e-9 * (1.0 + y.abs().max()):
                return False
    return True


def _formula(m: torch.nn.Module, c: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    if not isinstance(var, torch.Tensor):
        return None
    eps = getattr(m, "eps", getattr(m, "epsilon", 1e-5))
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    w = w if isinstance(w, torch.Tensor) else None
    b = b if isinstance(b, torch.Tensor) else None
    return bn_scale_shift(mean if isinstance(mean, torch.Tensor) else None, var, w, b, float(eps), c)


def _probe_fit(m: torch.nn.Module, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    with torch.no_grad():
        y0, y1 = m(torch.zeros_like(x)), m(torch.ones_like(x))
    if not isinstance(y0, torch.Tensor) or y0.shape != x.shape:
        return None
    idx = [0] * x.dim()
    idx[axis] = slice(None)
    t = y0[tuple(idx)].to(F64)  # [C]
    return (y1[tuple(idx)].to(F64) - t), t


def analyse(name: str, m: torch.nn.Module, members: list[str], x: torch.Tensor | None, calls: int) -> AffineUnit:
    """Decide whether unit ``m`` (float64, eval) is a per-channel affine map of its traced input ``x``."""
    u = AffineUnit(name, type(m).__name__, members, calls)
    if calls == 0 or x is None:
        u.reason = "not called with a single tensor in the traced forward"
        return u
    u.in_shape = tuple(x.shape)
    if isinstance(m, _BatchNorm) and (not m.track_running_stats or m.running_var is None):
        u.reason = "uses batch statistics in eval (track_running_stats=False)"
        return u
    c = _numel_c(m)
    axes = [a for a in ([1] if x.dim() > 1 else []) + list(range(x.dim() - 1, -1, -1)) if x.shape[a] == c]
    axes = list(dict.fromkeys(axes))
    if isinstance(m, _BatchNorm):
        axes = [1] if x.dim() > 1 else []
    gen = torch.Generator().manual_seed(0)
    probes = [x.to(F64), 3.0 * torch.randn(x.shape, generator=gen, dtype=F64) + 1.0]
    for axis in axes:
        st = _formula(m, c) if not members else None
        if st is not None and _fits(m, probes, *st, axis):
            u.axis, (u.s, u.t), u.how = axis, st, "formula"
            return u
        st = _probe_fit(m, probes[1], axis)
        if st is not None and _fits(m, probes, *st, axis):
            u.axis, (u.s, u.t), u.how = axis, st, "probe"
            return u
    u.reason = "its eval forward is not a per-channel scale and shift (e.g. a fused activation)"
    return u


def find_units(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, AffineUnit]:
    """Run ``model`` (float64, eval) once, capturing each unit's first input, and analyse every unit.
    A wrapper that the forward never calls (its members are called one by one) is split into its members."""
    check_eval(model)
    cands = candidates(model)
    seen = _record_inputs(model, cands, args, kwargs)
    split = {n: ms for n, ms in cands.items() if ms and seen[n][0] == 0}
    if split:
        cands = {k: v for n, v0 in cands.items()
                 for k, v in ([(n, v0)] if n not in split else [(m, []) for m in split[n]])}
        seen = _record_inputs(model, cands, args, kwargs)
    return {n: analyse(n, model.get_submodule(n), cands[n], seen[n][1], seen[n][0]) for n in cands}


def _record_inputs(model: torch.nn.Module, cands: dict[str, list[str]], args: tuple, kwargs: dict) -> dict:
    """``{unit: [calls, first input tensor or None]}`` from one forward of ``model``."""
    seen: dict[str, list[Any]] = {n: [0, None] for n in cands}
    hooks = []
    for name in cands:
        def hook(mod, inputs, name=name):
            rec = seen[name]
            rec[0] += 1
            if rec[1] is None and len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
                rec[1] = inputs[0].detach().clone()
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


class AffineMarker(torch.nn.Module):
    """Stand-in for a unit while tracing: a leaf computing ``s*x + t`` on ``axis``."""

    def __init__(self, s: torch.Tensor, t: torch.Tensor, axis: int):
        super().__init__()
        self.s = torch.nn.Parameter(s.clone(), requires_grad=False)
        self.t = torch.nn.Parameter(t.clone(), requires_grad=False)
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _bcast(self.s, x.dim(), self.axis).to(x.dtype) + _bcast(self.t, x.dim(), self.axis).to(x.dtype)
