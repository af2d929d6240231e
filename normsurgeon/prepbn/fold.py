"""Recalibrate the RepBN statistics, then fold every RepBN into its readers (float64, cast once).

Recalibration (SLAB §5.1 updates only the statistics at the end of training): every other module in
eval mode, each BN in train mode with ``momentum=None`` (a cumulative average of the per-batch
statistics), blend weight 0, parameters untouched. Afterwards each RepBN is the per-channel affine
``s * x + t`` (``RepBN.affine``), and a reader ``W`` becomes ``W diag(s)`` with bias ``b + W t``
(``fold_affine_into_reader``; a bias is created where the reader had none, and a reader whose weight
is tied to another module, e.g. GPT-2's ``lm_head`` and ``wte``, is untied first). The norm becomes
``Identity``: the folded model computes no normalization statistics.

>>> import torch
>>> from normsurgeon.prepbn.convert import Site
>>> from normsurgeon.prepbn.repbn import PRepBN
>>> m = torch.nn.Sequential(PRepBN(torch.nn.LayerNorm(4), 4), torch.nn.Linear(4, 3)).double()
>>> recalibrate(m, [torch.randn(8, 5, 4, dtype=torch.float64)], lambda mod, x: mod(x))
1
>>> x = torch.randn(2, 5, 4, dtype=torch.float64); ref = m.eval()(x)
>>> info = fold_sites(m, [Site("0", "final", "layernorm", 4, [("1", "linear")])])
>>> type(m[0]).__name__, bool((m(x) - ref).abs().max() < 1e-12)
('Identity', True)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch

from normsurgeon.prepbn.convert import Site
from normsurgeon.prepbn.repbn import PRepBN, prepbn_modules, set_blend
from normsurgeon.transforms.apply import mark_untied
from normsurgeon.transforms.primitives import fold_affine_into_reader
from normsurgeon.module_tree import set_module


@torch.no_grad()
def recalibrate(model: torch.nn.Module, batches: Iterable[Any], forward: Callable[[torch.nn.Module, Any], Any]) -> int:
    """Recompute every RepBN's running statistics on ``batches`` (cumulative average); returns the count."""
    mods = prepbn_modules(model)
    was_training = model.training
    model.eval()
    momenta = {}
    for name, m in mods.items():
        m.set_blend(0.0)
        bn = m.repbn.bn
        momenta[name] = bn.momentum
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    n = 0
    try:
        for batch in batches:
            forward(model, batch)
            n += 1
    finally:
        for name, m in mods.items():
            m.repbn.bn.momentum = momenta[name]
            m.repbn.bn.eval()
        model.train(was_training)
    if n == 0:
        raise ValueError("recalibration needs at least one batch")
    return n


@dataclasses.dataclass
class FoldInfo:
    identity: list[str]
    created_bias: list[str]
    untied: list[str]
    eta: dict[str, float]
    scale_range: dict[str, tuple[float, float]]  # per norm: min |s|, max |s|


def _tied(model: torch.nn.Module, param: torch.Tensor, owner: str) -> bool:
    return any(name != owner and any(p is param for p in mod.parameters(recurse=False))
               for name, mod in model.named_modules())


@torch.no_grad()
def fold_sites(model: torch.nn.Module, sites: list[Site]) -> FoldInfo:
    """In place: fold each site's eval-mode RepBN into its readers and replace it by ``Identity``.

    Do this on a float64 copy and cast once; the readers' tensors take the model's dtype.
    """
    info = FoldInfo([], [], [], {}, {})
    for s in sites:
        mod = model.get_submodule(s.name)
        if not isinstance(mod, PRepBN):
            raise ValueError(f"`{s.name}` is not a PRepBN module")
        scale, shift = mod.repbn.affine(torch.float64)
        info.eta[s.name] = float(mod.repbn.eta)
        info.scale_range[s.name] = (float(scale.abs().min()), float(scale.abs().max()))
        for r, layout in s.readers:
            reader = model.get_submodule(r)
            w = reader.weight
            if _tied(model, w, r):
                reader.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
                info.untied.append(r)
            had_bias = isinstance(getattr(reader, "bias", None), torch.Tensor)
            fold_affine_into_reader(reader, layout, scale.to(w.dtype), shift.to(w.dtype), create_bias=True)
            if not had_bias and isinstance(getattr(reader, "bias", None), torch.Tensor):
                info.created_bias.append(r)
        set_module(model, s.name, torch.nn.Identity())
        info.identity.append(s.name)
    if info.untied:
        mark_untied(model)
    return info


def finish_blend(model: torch.nn.Module) -> float:
    """Set every blend weight to 0; returns the largest weight found (0 when the schedule had ended)."""
    mods = prepbn_modules(model).values()
    worst = max((float(m.blend) for m in mods), default=0.0)
    set_blend(model, 0.0)
    return worst
