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


def fold_affine_tensors(w: torch.Tensor, bias: torch.Tensor | None, layout: str, gain: torch.Tensor | None,
                        shift: torch.Tensor | None, create_bias: bool, inplace: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Tensor form of ``fold_affine_into_reader``: return (weight, bias, shift_handled).

    ``inplace=True`` scales ``w`` in place (same values, no second copy; used by the streaming executor).

    >>> w = torch.ones(2, 3, dtype=torch.float64)
    >>> nw, nb, ok = fold_affine_tensors(w, None, "linear", torch.full((3,), 2.0, dtype=torch.float64),
    ...                                   torch.ones(3, dtype=torch.float64), create_bias=True)
    >>> nw[0].tolist(), nb.tolist(), ok
    ([2.0, 2.0, 2.0], [3.0, 3.0], True)
    """
    fold_shift = shift is not None and bool(torch.any(shift != 0)) and (bias is not None or create_bias)
    if fold_shift:
        # b' = b + W·shift with the un-scaled W; Linear [out, in] @ [in] -> [out]; Conv1D [in] @ [in, out].
        extra = w @ shift if layout == "linear" else shift @ w
        bias = extra if bias is None else bias + extra
    if gain is not None:
        g = gain[None, :] if layout == "linear" else gain[:, None]  # scale the input axis
        w = w.mul_(g) if inplace else w * g
    return w, bias, fold_shift or shift is None or not bool(torch.any(shift != 0))


def fold_affine_into_reader(module: torch.nn.Module, layout: str, gain: torch.Tensor | None,
                            shift: torch.Tensor | None, create_bias: bool) -> bool:
    """Make ``module(n)`` equal the old ``module(n * gain + shift)``. Returns whether the shift was folded.

    The shift is folded only when the module has a bias or ``create_bias`` is set; otherwise the caller
    keeps it on the norm.
    """
    bias = getattr(module, "bias", None)
    old_bias = bias.detach() if bias is not None else None
    w, new_bias, ok = fold_affine_tensors(module.weight.detach(), old_bias, layout, gain, shift, create_bias)
    if new_bias is not old_bias:
        _set(module, "bias", new_bias)
    if gain is not None:
        _set(module, "weight", w)
    return ok


def fold_scale_into_writer(w: torch.Tensor, bias: torch.Tensor | None, layout: str, gamma: torch.Tensor) -> None:
    """In place: ``gamma * (W h + b)`` becomes ``W' h + b'`` with W' = diag(gamma) W, b' = gamma * b (a
    layer scale folded into its writer); the caller then sets gamma to 1.

    >>> w = torch.ones(2, 3, dtype=torch.float64); b = torch.ones(2, dtype=torch.float64)
    >>> fold_scale_into_writer(w, b, "linear", torch.tensor([2.0, 3.0], dtype=torch.float64)); w[:, 0].tolist(), b.tolist()
    ([2.0, 3.0], [2.0, 3.0])
    """
    if layout == "linear":
        w.mul_(gamma[:, None])  # [out, in] * [out, 1]
    elif layout == "conv1d":
        w.mul_(gamma[None, :])  # [in, out] * [1, out]
    else:
        raise ValueError(f"cannot fold a layer scale into a writer with layout {layout}")
    if isinstance(bias, torch.Tensor):
        bias.mul_(gamma)  # [out]


def center_tensors(w: torch.Tensor, bias: torch.Tensor | None, layout: str) -> None:
    """In place: subtract the mean over the output (residual feature) axis; ``layout="param"`` is a bare
    parameter with the feature axis last.

    >>> w = torch.tensor([[1.0, 3.0]], dtype=torch.float64); center_tensors(w, None, "embedding"); w.tolist()
    [[-1.0, 1.0]]
    """
    if layout == "param":
        w.sub_(w.mean(-1, keepdim=True))  # [..., d]
        return
    if layout.startswith("param:"):  # stacked expert weights, e.g. [E, d, d_ff]: centre the output axis
        w.sub_(w.mean(int(layout.split(":")[1]), keepdim=True))
        return
    if layout in ("linear", "conv"):
        w.sub_(w.mean(0, keepdim=True))  # [out, ...] -> centre over out
    elif layout in ("conv1d", "embedding"):
        w.sub_(w.mean(1, keepdim=True))  # [in, out] / [vocab, d] -> centre over the last axis
    else:
        raise ValueError(f"cannot centre a writer with layout {layout}")
    if isinstance(bias, torch.Tensor) and layout != "embedding":
        bias.sub_(bias.mean())


def center_writer(module: torch.nn.Module | None, param: torch.nn.Parameter | None = None) -> None:
    """Subtract the mean over the output (residual feature) axis from a writer's weight and bias."""
    with torch.no_grad():
        if param is not None:
            center_tensors(param, None, "param")
            return
        center_tensors(module.weight, getattr(module, "bias", None), layout_of(module))


def bake_norm_into_table(embedding: torch.nn.Embedding, norm: torch.nn.Module) -> None:
    """Replace table rows by ``norm(row)``: exact when the norm reads nothing but the token's row."""
    with torch.no_grad():
        embedding.weight.copy_(norm(embedding.weight))  # [vocab, d] -> [vocab, d]


def shrink_writer_tensors(w: torch.Tensor, bias: torch.Tensor | None, layout: str
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tensor form of ``shrink_writer``: drop the last residual coordinate (``layout="param"``: last axis)."""
    if layout == "param":
        return w[..., :-1].clone(), None
    if layout in ("linear", "conv"):
        w = w[:-1].clone()
    elif layout in ("conv1d", "embedding"):
        w = w[:, :-1].clone()
    else:
        raise ValueError(f"cannot shrink a writer with layout {layout}")
    if isinstance(bias, torch.Tensor) and layout != "embedding":
        bias = bias[:-1].clone()
    return w, bias


def shrink_reader_tensor(w: torch.Tensor, layout: str) -> torch.Tensor:
    """Tensor form of ``shrink_reader``: W'[:, i] = W[:, i] - W[:, d-1] along the input axis."""
    if layout == "linear":
        return w[:, :-1] - w[:, -1:]  # [out, d] -> [out, d-1]
    if layout == "conv1d":
        return w[:-1, :] - w[-1:, :]  # [d, out] -> [d-1, out]
    raise ValueError(f"cannot shrink a reader with layout {layout}")


def shrink_writer(module: torch.nn.Module | None, param_owner: torch.nn.Module | None = None,
                  param_name: str | None = None) -> None:
    """Drop the last residual coordinate a (centred) writer produces: width d -> d-1 (Pre-CRMSNorm)."""
    if param_owner is not None:
        p = getattr(param_owner, param_name)
        setattr(param_owner, param_name, torch.nn.Parameter(shrink_writer_tensors(p.detach(), None, "param")[0],
                                                            requires_grad=False))
        return
    layout = layout_of(module)
    bias = getattr(module, "bias", None)
    w, new_bias = shrink_writer_tensors(module.weight.detach(), bias.detach() if isinstance(bias, torch.Tensor)
                                        else None, layout)
    _replace(module, "weight", w)
    if layout == "linear":
        module.out_features -= 1
    elif layout == "conv":
        module.out_channels -= 1
    elif layout == "conv1d":
        module.nf -= 1
    elif layout == "embedding":
        module.embedding_dim -= 1
    if isinstance(bias, torch.Tensor) and layout != "embedding":
        _replace(module, "bias", new_bias)


def shrink_reader(module: torch.nn.Module) -> None:
    """Read a zero-mean d-vector from its first d-1 coordinates: W'[:, i] = W[:, i] - W[:, d-1]."""
    layout = layout_of(module)
    _replace(module, "weight", shrink_reader_tensor(module.weight.detach(), layout))
    if layout == "linear":
        module.in_features -= 1
    elif layout == "conv1d" and hasattr(module, "nx"):
        module.nx -= 1


def _replace(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
