"""Carry out folds and merges on a float64 model, and cast a result back to the source dtypes once.

>>> import torch
>>> m = torch.nn.Linear(2, 2)
>>> m.bias = None
>>> add_bias(m, torch.ones(2, dtype=torch.float64))
>>> m.bias.tolist()
[1.0, 1.0]
"""
from __future__ import annotations

import torch

from normsurgeon.batchnorm.fold_math import F64, embed_kernel, fold_into_consumer, fold_into_producer, identity_kernel
from normsurgeon.batchnorm.patterns import Fold
from normsurgeon.batchnorm.rep import Merge
from normsurgeon.batchnorm.units import AffineUnit


class ZeroBranch(torch.nn.Module):
    """A merged-away branch: returns a 0-dim zero that broadcasts in the surviving sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(())


def add_bias(layer: torch.nn.Module, b: torch.Tensor) -> None:
    """Set ``layer.bias`` to ``b`` (creating the parameter if the layer had none)."""
    if layer.bias is None:
        layer.bias = torch.nn.Parameter(b.to(layer.weight.dtype).clone(), requires_grad=False)
    else:
        layer.bias.data = b.to(layer.bias.dtype).clone()


def apply_fold(model: torch.nn.Module, f: Fold, u: AffineUnit) -> None:
    """Fold unit ``u``'s ``(s, t)`` into ``f.layer`` (float64 model, in place); the unit is not touched."""
    layer = model.get_submodule(f.layer)
    fn = fold_into_producer if f.direction == "producer" else fold_into_consumer
    w, b = fn(layer.weight, layer.bias, u.s, u.t, f.layout, f.groups)
    layer.weight.data = w.to(layer.weight.dtype)
    add_bias(layer, b)


def apply_merge(model: torch.nn.Module, m: Merge, units: dict[str, AffineUnit]) -> None:
    """Add the (already BN-folded) branch kernels and the identity kernels into ``m.main``."""
    main = model.get_submodule(m.main)
    w = main.weight.detach().to(F64)  # [C_out, C_in/g, k...]
    b = torch.zeros(w.shape[0], dtype=F64) if main.bias is None else main.bias.detach().to(F64)  # [C_out]
    k = tuple(w.shape[2:])
    for name, off in m.branches.items():
        br = model.get_submodule(name)
        w = w + embed_kernel(br.weight.detach().to(F64), k, off)
        if br.bias is not None:
            b = b + br.bias.detach().to(F64)
    for name, centre in m.identities.items():
        u = units[name]
        k_id = identity_kernel(w.shape[0], w.shape[1], k, centre)  # [C, C_in/g, k...]
        w = w + k_id * u.s.reshape(-1, *([1] * (w.dim() - 1)))
        b = b + u.t
    main.weight.data = w.to(main.weight.dtype)
    add_bias(main, b)


def cast_back(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> torch.nn.Module:
    """Give every tensor its source dtype; a created bias takes its layer's weight dtype."""
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            owner, _, attr = name.rpartition(".")
            dt = dtypes.get(name) or dtypes.get(f"{owner}.weight" if owner else "weight")
            if dt is not None and p.dtype != dt and p.is_floating_point():
                p.data = p.data.to(dt)
    return model
