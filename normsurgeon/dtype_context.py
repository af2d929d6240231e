"""Run a model in float64 as if float64 were torch's default dtype.

Some model code creates tensors without a dtype (XGLM: ``torch.full((), torch.finfo(x.dtype).min)``),
which are float32 by default; in a float64 forward that value overflows float32 and the model crashes.
Under ``default_dtype_for(model)`` those tensors are float64 too. Only float32 and float64 can be torch's
default, so other dtypes leave it alone.

>>> import torch
>>> m = torch.nn.Linear(2, 2).double()
>>> with default_dtype_for(m):
...     torch.full((), torch.finfo(torch.float64).min).dtype
torch.float64
>>> torch.get_default_dtype()
torch.float32
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def default_dtype_for(model: torch.nn.Module) -> Iterator[None]:
    """torch's default dtype is the model's float64 while inside, if the model is float64."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    if p is None or p.dtype != torch.float64 or torch.get_default_dtype() == torch.float64:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
