"""How a leaf module's weight maps inputs to outputs: the facts folding and centering need.

A "reader" consumes a normalized vector along its input axis; a "writer" adds its output into the
residual stream along its output axis. GPT-2's ``Conv1D`` stores ``[in, out]``, ``nn.Linear``
``[out, in]``, convolutions ``[out, in/groups, *k]``, embeddings ``[vocab, d]``.

>>> import torch
>>> layout_of(torch.nn.Linear(3, 5))
'linear'
>>> out_features(torch.nn.Linear(3, 5))
5
"""
from __future__ import annotations

import torch


def layout_of(module: torch.nn.Module) -> str | None:
    """One of "linear", "conv1d" (GPT-2 style [in, out]), "embedding", "conv", or None if unknown."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed:
        return "conv"
    # transformers' Conv1D: y = x @ W + b with W [nx, nf]; recognised by its attributes, not its name.
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "nf"):
        if weight.shape[1] == module.nf:
            return "conv1d"
    return None


def in_features(module: torch.nn.Module) -> int | None:
    layout = layout_of(module)
    if layout == "linear":
        return module.weight.shape[1]
    if layout == "conv1d":
        return module.weight.shape[0]
    return None


def out_features(module: torch.nn.Module) -> int | None:
    layout = layout_of(module)
    if layout == "linear":
        return module.weight.shape[0]
    if layout == "conv1d":
        return module.weight.shape[1]
    if layout == "embedding":
        return module.weight.shape[1]
    if layout == "conv":
        return module.weight.shape[0]
    return None


def has_bias(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)
