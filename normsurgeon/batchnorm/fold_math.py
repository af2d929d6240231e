"""Float64 formulas for folding a per-channel affine ``y = s*x + t`` into a neighbouring conv or linear.

Every function takes and returns float64 tensors; callers cast to the model dtype once, at the end.
Notation (eval BatchNorm): ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``.

>>> import torch
>>> w = torch.randn(4, 3, dtype=torch.float64); b = torch.randn(4, dtype=torch.float64)
>>> s = torch.rand(4, dtype=torch.float64) + 0.5; t = torch.randn(4, dtype=torch.float64)
>>> w2, b2 = fold_into_producer(w, b, s, t, "linear", groups=1)
>>> x = torch.randn(2, 3, dtype=torch.float64)
>>> bool(torch.allclose(x @ w2.T + b2, (x @ w.T + b) * s + t))
True
"""
from __future__ import annotations

import torch

F64 = torch.float64


def bn_scale_shift(mean: torch.Tensor | None, var: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as ``(s, t)``, both ``[C]`` float64. Missing stats/affine mean 0/1 (``affine=False``).

    >>> s, t = bn_scale_shift(torch.zeros(2), torch.full((2,), 3.0), None, None, eps=1.0, num=2)
    >>> s.tolist(), t.tolist()
    ([0.5, 0.5], [0.0, 0.0])
    """
    mean64 = torch.zeros(num, dtype=F64) if mean is None else mean.detach().to(F64)  # [C]
    var64 = torch.ones(num, dtype=F64) if var is None else var.detach().to(F64)  # [C]
    w64 = torch.ones(num, dtype=F64) if weight is None else weight.detach().to(F64)  # [C]
    b64 = torch.zeros(num, dtype=F64) if bias is None else bias.detach().to(F64)  # [C]
    s = w64 / torch.sqrt(var64 + eps)  # [C]
    return s, b64 - mean64 * s


def _bias64(bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=F64) if bias is None else bias.detach().to(F64)


def fold_into_producer(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, t: torch.Tensor,
                       layout: str, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``affine(layer(x))`` as one layer: scale the output channels, ``b' = s*b + t``.

    layout "conv"/"linear": weight ``[C_out, C_in/g, k...]`` / ``[C_out, C_in]``, output channel on axis 0.
    layout "conv_transpose": weight ``[C_in, C_out/g, k...]``; output channel ``o = gi*(C_out/g) + j`` sits
    at axis 1 inside group ``gi`` (rows ``gi*C_in/g ...``), so the scale is reshaped per group.
    """
    w = weight.detach().to(F64)
    if layout == "conv_transpose":
        c_in, c_out_g = w.shape[0], w.shape[1]
        wg = w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])  # [g, C_in/g, C_out/g, k...]
        sg = s.reshape(groups, 1, c_out_g, *([1] * (w.dim() - 2)))  # [g, 1, C_out/g, 1...]
        w_new = (wg * sg).reshape(w.shape)
        n_out = groups * c_out_g
    else:
        w_new = w * s.reshape(-1, *([1] * (w.dim() - 1)))  # [C_out, ...] * [C_out, 1...]
        n_out = w.shape[0]
    return w_new, s * _bias64(bias, n_out) + t  # [C_out]


def fold_into_consumer(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, t: torch.Tensor,
                       layout: str, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer(affine(x))`` as one layer: scale the input channels, ``b' = b + sum_{c,k} W[o,c,k] t_c``.

    Exact for a linear layer and for a conv that never reads padding (the caller checks); grouped
    convs see the slice of ``s``/``t`` of their group.
    """
    w = weight.detach().to(F64)
    n_out = w.shape[0]
    if layout == "linear":
        return w * s.reshape(1, -1), _bias64(bias, n_out) + w @ t  # [O, I] * [1, I]; [O] + [O, I] @ [I]
    c_in_g = w.shape[1]
    o_g = n_out // groups
    k = w.dim() - 2
    sg = s.reshape(groups, 1, c_in_g, *([1] * k))  # [g, 1, C_in/g, 1...]
    tg = t.reshape(groups, 1, c_in_g, *([1] * k))
    wg = w.reshape(groups, o_g, c_in_g, *w.shape[2:])  # [g, O/g, C_in/g, k...]
    shift = (wg * tg).flatten(2).sum(-1).reshape(n_out)  # [O]
    return (wg * sg).reshape(w.shape), _bias64(bias, n_out) + shift


def identity_kernel(channels: int, in_per_group: int, kernel: tuple[int, ...], centre: tuple[int, ...],
                    dtype=F64) -> torch.Tensor:
    """Conv kernel ``[C, C_in/g, k...]`` that maps each channel to itself (RepVGG identity branch): a single
    1 at ``[i, i mod (C_in/g), centre...]``."""
    k_id = torch.zeros(channels, in_per_group, *kernel, dtype=dtype)
    for i in range(channels):
        k_id[(i, i % in_per_group, *centre)] = 1.0
    return k_id


def embed_kernel(w: torch.Tensor, kernel: tuple[int, ...], offset: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad a smaller kernel ``[O, I, k_b...]`` into ``kernel`` at ``offset`` (RepVGG 1x1 branch)."""
    out = torch.zeros(*w.shape[:2], *kernel, dtype=w.dtype)
    idx = (slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offset, w.shape[2:]))
    out[idx] = w
    return out
