"""Replace a submodule by its qualified name: the one way every recipe swaps modules.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
>>> set_module(m, "1", torch.nn.Identity())
>>> type(m[1]).__name__
'Identity'
"""
from __future__ import annotations

import torch


def set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """``model.<name> = new`` for a dotted ``name`` such as ``transformer.h.0.ln_1``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
