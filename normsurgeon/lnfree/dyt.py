"""Dynamic Tanh (Zhu, Chen, He, LeCun, Liu 2025, "Transformers without Normalization"):
``DyT(x) = tanh(alpha * x) * weight + bias`` with a learnable scalar ``alpha``.

The paper initialises ``alpha = 0.5`` (``alpha0``), ``weight = 1``, ``bias = 0`` for training from
scratch; when a trained norm is replaced, normsurgeon keeps its gain and shift (an offset RMSNorm's gain
``1 + w`` is stored as the DyT weight) and starts ``alpha`` at ``alpha0`` (or at ``1 / sigma`` with
``dyt_alpha0: null``, so that ``tanh(alpha x)`` starts close to the normalised input).

>>> import torch
>>> m = DyT(4, alpha0=0.5)
>>> x = torch.randn(2, 4)
>>> torch.allclose(m(x), torch.tanh(0.5 * x))
True
"""
from __future__ import annotations

import torch


class DyT(torch.nn.Module):
    def __init__(self, size: int, alpha0: float = 0.5, weight: bool = True, bias: bool = True,
                 weight_attr: str = "weight", bias_attr: str = "bias"):
        super().__init__()
        self.size = int(size)
        self.weight_attr, self.bias_attr = weight_attr, bias_attr
        self.alpha = torch.nn.Parameter(torch.full((), float(alpha0)))
        if weight:
            setattr(self, weight_attr, torch.nn.Parameter(torch.ones(size)))
        if bias:
            setattr(self, bias_attr, torch.nn.Parameter(torch.zeros(size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.alpha * x)  # [..., d]
        w, b = getattr(self, self.weight_attr, None), getattr(self, self.bias_attr, None)
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={float(self.alpha):.4g}"
