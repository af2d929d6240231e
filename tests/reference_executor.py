"""The module-level executor ``convert`` used before the one-engine refactor (issue 14), kept unchanged as
an independent oracle: it rewrites a float64 model's modules in place, step by step, while the engine
(``normsurgeon/stream/``) computes output tensors job by job. tests/test_one_engine.py checks that both
give the same tensors on every zoo family.
"""
from __future__ import annotations

import torch

from normsurgeon.module_tree import set_module
from normsurgeon.io.formats import norm_width
from normsurgeon.modules import CentredLayerNorm, CRMSNorm, RMSNorm
from normsurgeon.transforms.apply import mark_untied  # config bookkeeping only, not math
from normsurgeon.transforms.plan import RmsPlan
from normsurgeon.transforms.primitives import (bake_norm_into_table, center_tensors, center_writer,
                                               fold_affine_into_reader,
                                               fold_scale_into_writer, shrink_reader, shrink_writer)


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def untie_output_embeddings(model: torch.nn.Module, plan: RmsPlan) -> None:
    for reader, _ in plan.untie:
        mod = model.get_submodule(reader)
        mod.weight = torch.nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
    if plan.untie:
        mark_untied(model)


def bake_embedding_norms(model: torch.nn.Module, plan: RmsPlan) -> None:
    """Embedding norms: baked into their one table (BLOOM), or made to centre their output when they
    read several tables (mBART: tokens + positions)."""
    modules = dict(model.named_modules())
    for norm_name, table in plan.bake:
        bake_norm_into_table(modules[table], modules[norm_name])
        set_module(model, norm_name, torch.nn.Identity())
    for norm_name in plan.recentre:
        old = modules[norm_name]
        set_module(model, norm_name, CentredLayerNorm(norm_width(old), old.eps, getattr(old, "weight", None),
                                                      getattr(old, "bias", None)))


def fold_norm_affine(model: torch.nn.Module, plan: RmsPlan) -> None:
    modules = dict(model.named_modules())
    for f in plan.folds:
        norm = modules[f.norm]
        weight = getattr(norm, f.weight_attr, None)
        bias = getattr(norm, f.bias_attr, None)
        gain = weight.detach() + f.gain_offset if (f.fold_gain and weight is not None) else None  # (1+w) gains
        shift = bias.detach().clone() if (f.fold_shift and bias is not None) else None
        if not f.fold_gain:
            continue
        for reader, layout in f.readers:
            fold_affine_into_reader(modules[reader], layout, gain, shift, create_bias=f.fold_shift)
        with torch.no_grad():
            if gain is not None:
                weight.fill_(1.0 - f.gain_offset)  # unit gain
            if shift is not None:
                bias.zero_()


def center_writers(model: torch.nn.Module, plan: RmsPlan) -> None:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for name, kind in plan.center:
        if kind == "param":
            center_writer(None, params[name])
            continue
        if kind.startswith("param:"):  # fused expert weights (graph/decompose.py param_product)
            with torch.no_grad():
                center_tensors(params[name], None, kind)
            continue
        scale = plan.layer_scales.get(name)
        if scale is not None:  # gamma * W(h): fold gamma into W first (graph/layer_scale.py), gamma := 1
            mod, gamma = modules[name], params[scale]
            with torch.no_grad():
                fold_scale_into_writer(mod.weight, getattr(mod, "bias", None), kind, gamma.detach())
                gamma.fill_(1.0)
        center_writer(modules[name])


def replace_norms(model: torch.nn.Module, plan: RmsPlan) -> None:
    modules = dict(model.named_modules())
    attrs = {f.norm: (f.weight_attr, f.bias_attr, f.gain_offset) for f in plan.folds}
    for name, eps in plan.replace.items():
        old = modules[name]
        w_attr, b_attr, offset = attrs.get(name, ("weight", "bias", 0.0))
        if plan.target == "crmsnorm":
            new: torch.nn.Module = CRMSNorm(plan.hidden_size, eps)
        else:
            new = RMSNorm(plan.hidden_size, eps, weight=getattr(old, w_attr, None), bias=getattr(old, b_attr, None),
                          gain_offset=offset)
        set_module(model, name, new)


def shrink_residual(model: torch.nn.Module, plan: RmsPlan) -> None:
    """Drop the redundant last residual coordinate: writers lose an output, readers an input."""
    modules = dict(model.named_modules())
    for name, kind in plan.center:
        if kind == "param":
            owner, attr = _parent(model, name)
            shrink_writer(None, owner, attr)
        else:
            shrink_writer(modules[name])
    for scale in plan.layer_scales.values():  # all ones after centring: keep d-1 of them
        owner, attr = _parent(model, scale)
        shrink_writer(None, owner, attr)
    for f in plan.folds:
        for reader, _ in f.readers:
            shrink_reader(modules[reader])


# The registered step handlers recipes refer to, in the order a recipe normally lists them.
STEPS = {
    "untie_tied_readers": untie_output_embeddings,
    "bake_embedding_norms": bake_embedding_norms,
    "fold_norm_affine": fold_norm_affine,
    "center_writers": center_writers,
    "replace_norms": replace_norms,
    "shrink_residual": shrink_residual,
}
DEFAULT_STEPS = {
    "rmsnorm": ["untie_tied_readers", "bake_embedding_norms", "fold_norm_affine", "center_writers", "replace_norms"],
    "crmsnorm": ["untie_tied_readers", "bake_embedding_norms", "fold_norm_affine", "center_writers", "replace_norms",
                 "shrink_residual"],
}


def apply_rms_plan(model: torch.nn.Module, plan: RmsPlan, steps: list[str] | None = None) -> None:
    """Rewrite ``model`` (float64) into Pre-RMSNorm / Pre-CRMSNorm form, in place, as the plan says."""
    for step in steps or DEFAULT_STEPS[plan.target]:
        STEPS[step](model, plan)
