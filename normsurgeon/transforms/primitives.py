"""Float64 primitives for folding a norm's affine into its readers and centring residual writers.

All functions edit modules in place and expect float64 parameters (the caller upcasts once and casts
back once). Layouts: ``nn.Linear`` weight [out, in]; GPT-2 ``Conv1D`` weight [in, out]; ``Conv`` weight
[out, in/groups, *k]; ``Embedding`` weight [vocab, d]; a bare parameter has the feature axis last.

>>> import torch
>>> lin = torch.nn.Linear(4, 3).double()
>>> x = torch.randn(5, 4, dtype=torch.float64)
>>> g, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
>>> ref = lin(x * g + b)
>>> fold_affine_into_reader(lin, "linear", g, b, create_bias=True)
True
>>> torch.allclose(lin(x), ref)
True
"""
from __future__ import annotations

import torch

from normsurgeon.graph.layouts import layout_of


def _set(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    param = getattr(module, name, None)
    if isinstance(param, torch.nn.Parameter) and param.shape == value.shape:
        with torch.no_grad():
            param.copy_(value)
    else:
        setattr(module, name, torch.nn.Parameter(value, requires_grad=False))


def fold_affine_into_reader(module: torch.nn.Module, layout: str, gain: torch.Tensor | None,
                            shift: torch.Tensor | None, create_bias: bool) -> bool:
    """Make ``module(n)`` equal the old ``module(n * gain + shift)``. Returns whether the shift was folded.

    The shift is folded only when the module has a bias or ``create_bias`` is set; otherwise the caller
    keeps it on the norm.
    """
    w = module.weight.detach()
    bias = getattr(module, "bias", None)
    fold_shift = shift is not None and bool(torch.any(shift != 0)) and (bias is not None or create_bias)
    if fold_shift:
        # b' = b + W·shift with the un-scaled W; Linear [out, in] @ [in] -> [out]; Conv1D [in] @ [in, out].
        extra = w @ shift if layout == "linear" else shift @ w
        new_bias = extra if bias is None else bias.detach() + extra
        _set(module, "bias", new_bias)
    if gain is not None:
        scaled = w * gain[None, :] if layout == "linear" else w * gain[:, None]  # scale the input axis
        _set(module, "weight", scaled)
    return fold_shift or shift is None or not bool(torch.any(shift != 0))


def center_writer(module: torch.nn.Module | None, param: torch.nn.Parameter | None = None) -> None:
    """Subtract the mean over the output (residual feature) axis from a writer's weight and bias."""
    if param is not None:
        with torch.no_grad():
            param.sub_(param.mean(-1, keepdim=True))  # [..., d]
        return
    layout = layout_of(module)
    w = module.weight
    with torch.no_grad():
        if layout in ("linear", "conv"):
            w.sub_(w.mean(0, keepdim=True))  # [out, ...] -> centre over out
        elif layout in ("conv1d", "embedding"):
            w.sub_(w.mean(1, keepdim=True))  # [in, out] / [vocab, d] -> centre over the last axis
        else:
            raise ValueError(f"cannot centre a writer with layout {layout}")
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and layout != "embedding":
            bias.sub_(bias.mean())


def bake_norm_into_table(embedding: torch.nn.Embedding, norm: torch.nn.Module) -> None:
    """Replace table rows by ``norm(row)``: exact when the norm reads nothing but the token's row."""
    with torch.no_grad():
        embedding.weight.copy_(norm(embedding.weight))  # [vocab, d] -> [vocab, d]


def shrink_writer(module: torch.nn.Module | None, param_owner: torch.nn.Module | None = None,
                  param_name: str | None = None) -> None:
    """Drop the last residual coordinate a (centred) writer produces: width d -> d-1 (Pre-CRMSNorm)."""
    if param_owner is not None:
        p = getattr(param_owner, param_name)
        setattr(param_owner, param_name, torch.nn.Parameter(p.detach()[..., :-1].clone(), requires_grad=False))
        return
    layout = layout_of(module)
    w = module.weight.detach()
    if layout in ("linear", "conv"):
        _replace(module, "weight", w[:-1].clone())
        if layout == "linear":
            module.out_features -= 1
        else:
            module.out_channels -= 1
    elif layout == "conv1d":
        _replace(module, "weight", w[:, :-1].clone())
        module.nf -= 1
    elif layout == "embedding":
        _replace(module, "weight", w[:, :-1].clone())
        module.embedding_dim -= 1
    else:
        raise ValueError(f"cannot shrink a writer with layout {layout}")
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and layout != "embedding":
        _replace(module, "bias", bias.detach()[:-1].clone())


def shrink_reader(module: torch.nn.Module) -> None:
    """Read a zero-mean d-vector from its first d-1 coordinates: W'[:, i] = W[:, i] - W[:, d-1]."""
    layout = layout_of(module)
    w = module.weight.detach()
    if layout == "linear":
        _replace(module, "weight", (w[:, :-1] - w[:, -1:]).clone())  # [out, d] -> [out, d-1]
        module.in_features -= 1
    elif layout == "conv1d":
        _replace(module, "weight", (w[:-1, :] - w[-1:, :]).clone())  # [d, out] -> [d-1, out]
        if hasattr(module, "nx"):
            module.nx -= 1
    else:
        raise ValueError(f"cannot shrink a reader with layout {layout}")


def _replace(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
