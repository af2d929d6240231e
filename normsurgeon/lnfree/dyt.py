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

from normsurgeon.modules import DyT  # defined with the other output modules (io/formats.py rebuilds it)

__all__ = ["DyT"]
