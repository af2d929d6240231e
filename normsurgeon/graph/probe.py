"""Probe forwards: run a model once more and read back what chosen torch calls received.

``CallRecorder`` keeps the tensor arguments of chosen calls by function name and occurrence, counting
calls exactly as the tracer (``trace.py``) makes op nodes of them (never inside a leaf module), so that
``occurrence(graph, node)`` names a graph node's call in the probe. ``decode_channels`` reads back the
channel numbers a probe wrote into a layer's output (``placement`` maps fused q/k/v projections so).

>>> import torch
>>> x = (torch.arange(4.0).reshape(2, 1, 2) + 1.0).expand(2, 3, 2)  # [heads, tokens, hd]: channel c as c + 1
>>> decode_channels(x, x + 0.5, hd=2, tokens=3)                      # the second probe wrote c + 1.5
[[0, 1], [2, 3]]
"""
from __future__ import annotations

import collections
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from normsurgeon.graph.trace import DataflowGraph, is_leaf


class CallRecorder(TorchFunctionMode):
    """Keep the tensor arguments of chosen calls (by function name and occurrence), skipping calls made
    inside leaf modules, so that occurrences count exactly as the tracer's op nodes do."""

    def __init__(self, want: dict[str, set[int]]):
        super().__init__()
        self.want, self.count, self.got, self.depth = want, collections.Counter(), {}, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if self.depth == 0 and name in self.want:
            k = self.count[name]
            self.count[name] += 1
            if k in self.want[name]:
                self.got[(name, k)] = [a.detach().clone() for a in tree_flatten((args, kwargs))[0]
                                       if isinstance(a, torch.Tensor)]
        return out


def occurrence(graph: DataflowGraph, idx: int) -> tuple[str, int]:
    n = graph.nodes[idx]
    k = sum(1 for m in graph.nodes[:idx] if m.kind == "op" and m.target == n.target and m.out_index == 0)
    return n.target, k


@torch.no_grad()
def capture(model, ex: dict, want: dict[str, set[int]], hooks: dict[str, Any]) -> dict:
    from normsurgeon.dtype_context import default_dtype_for

    mode = CallRecorder(want)
    handles = []

    def enter(mod, args):
        mode.depth += 1

    def leave(mod, args, out):
        mode.depth -= 1

    for name, mod in model.named_modules():
        if name and is_leaf(mod):
            handles.append(mod.register_forward_pre_hook(enter))
            handles.append(mod.register_forward_hook(leave))
    for name, fn in hooks.items():  # registered last: they run after ``leave``, outside the mode's count
        handles.append(model.get_submodule(name).register_forward_hook(fn))
    try:
        with default_dtype_for(model), mode:
            model(**ex)
    finally:
        for h in handles:
            h.remove()
    return mode.got


def decode_channels(x1: torch.Tensor, x2: torch.Tensor, hd: int, tokens: int) -> list[list[int]] | None:
    """Channel numbers per head from the two probe values at position 0 (None when not clean)."""
    axes = [d for d, s in enumerate(x1.shape) if s == tokens]
    if len(axes) != 1 or hd <= 0:
        return None
    x1, x2 = x1.select(axes[0], 0), x2.select(axes[0], 0)
    if x1.shape[-1] != hd:
        return None
    s = 2.0 * (x2 - x1)
    if (s.abs() < 1e-12).any():
        return None
    c = x1 / s - 1.0
    r = c.round()
    if (c - r).abs().max() > 1e-3:
        return None
    heads: list[list[int]] = []
    for row in r.reshape(-1, hd).long().tolist():
        if row not in heads:  # repeated key/value heads (GQA, multi-query) count once
            heads.append(row)
    return heads


def first_tensor(out):
    """A module's output tensor (the first one of a tuple: MoE layers may also return router logits)."""
    return out[0] if isinstance(out, (tuple, list)) else out
