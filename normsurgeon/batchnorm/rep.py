"""Structural re-parameterization: parallel branches on one input, summed, become one conv.

RepVGG ``y = BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)``: after each branch BN is folded into its conv, the
1x1 kernel is zero-padded into the 3x3 one (centres aligned through the paddings), the identity BN becomes
the kernel ``s_i`` at ``[i, i mod C_in/g, centre]``, and kernels and biases add. The sum is found in the
dataflow (a tree of ``add`` ops whose leaves read the same tensor), never from module names.

>>> import torch
>>> conv = torch.nn.Conv2d(4, 4, 3, padding=1)
>>> branch = torch.nn.Conv2d(4, 4, 1)
>>> branch_offset(conv, branch)
(1, 1)
"""
from __future__ import annotations

import dataclasses

import torch
from torch.nn.modules.conv import _ConvNd

from normsurgeon.batchnorm.patterns import Fold, _sole_user, layout_of
from normsurgeon.batchnorm.units import AffineUnit
from normsurgeon.graph.trace import DataflowGraph

_ADDS = {"add", "add_", "__add__", "__iadd__", "__radd__"}


@dataclasses.dataclass
class Merge:
    """``main`` absorbs the convs in ``branches`` (name -> kernel offset) and the identity ``units``."""

    main: str
    branches: dict[str, tuple[int, ...]]
    identities: dict[str, tuple[int, ...]]  # unit -> centre index in the main kernel


def _pad(conv: _ConvNd) -> tuple[int, ...] | None:
    if isinstance(conv.padding, str):
        return tuple(0 for _ in conv.kernel_size) if conv.padding == "valid" else None
    return tuple(conv.padding)


def branch_offset(main: _ConvNd, b: _ConvNd) -> tuple[int, ...] | None:
    """Where ``b``'s kernel sits inside ``main``'s so both read the same input pixels, or None."""
    pm, pb = _pad(main), _pad(b)
    if pm is None or pb is None or main.stride != b.stride or main.groups != b.groups \
            or main.in_channels != b.in_channels or main.out_channels != b.out_channels \
            or main.padding_mode != "zeros" or b.padding_mode != "zeros" or type(main) is not type(b):
        return None
    out = []
    for k, p, d, kb, q, db in zip(main.kernel_size, pm, main.dilation, b.kernel_size, pb, b.dilation):
        if kb != 1 and db != d or (p - q) % d:
            return None
        off = (p - q) // d
        if off < 0 or off + kb > k:
            return None
        out.append(off)
    return tuple(out)


def identity_centre(main: _ConvNd) -> tuple[int, ...] | None:
    """The kernel index that makes ``main`` read pixel ``i`` for output ``i`` (stride 1, C_in == C_out)."""
    pm = _pad(main)
    if pm is None or any(s != 1 for s in main.stride) or main.in_channels != main.out_channels \
            or main.padding_mode != "zeros":
        return None
    centre = []
    for k, p, d in zip(main.kernel_size, pm, main.dilation):
        if p % d or p // d >= k:
            return None
        centre.append(p // d)
    return tuple(centre)


def _add_leaves(g: DataflowGraph, idx: int) -> list[int]:
    n = g.nodes[idx]
    if n.kind == "op" and n.target in _ADDS and len(n.inputs) == 2 and not n.scalars and not n.kwargs:
        out = []
        for i in n.inputs:
            child = g.nodes[i]
            inner = child.kind == "op" and child.target in _ADDS and _sole_user(g, i) is n
            out += _add_leaves(g, i) if inner else [i]
        return out
    return [idx]


def find_merges(g: DataflowGraph, units: dict[str, AffineUnit], folds: list[Fold],
                left: dict[str, str]) -> list[Merge]:
    """Sums of parallel conv(+BN) / identity-BN branches reading one tensor."""
    into = {f.unit: f for f in folds if f.direction == "producer" and f.layout == "conv"}
    merges = []
    for n in g.nodes:
        if not (n.kind == "op" and n.target in _ADDS) or any(
                g.nodes[u].kind == "op" and g.nodes[u].target in _ADDS and _sole_user(g, n.idx) is g.nodes[u]
                for u in g.users.get(n.idx, [])):
            continue  # not the root of an add tree
        groups: dict[int, list[tuple[str, str]]] = {}
        for leaf in _add_leaves(g, n.idx):
            node = g.nodes[leaf]
            if node.kind != "module" or len(g.module_nodes(node.target)) != 1 or _sole_user(g, leaf) is None:
                continue
            name = node.target
            if name in into and g.nodes[node.inputs[0]].target == into[name].layer:
                conv_node = g.nodes[node.inputs[0]]
                groups.setdefault(conv_node.inputs[0], []).append(("conv", into[name].layer))
            elif layout_of(g.modules[name]) == "conv" and len(node.inputs) == 1:
                groups.setdefault(node.inputs[0], []).append(("conv", name))
            elif name in left and units.get(name) is not None and units[name].reason is None \
                    and units[name].axis == 1 and len(node.inputs) == 1:
                groups.setdefault(node.inputs[0], []).append(("id", name))
        for members in groups.values():
            m = _merge(g, members)
            if m is not None:
                merges.append(m)
    return merges


def _merge(g: DataflowGraph, members: list[tuple[str, str]]) -> Merge | None:
    convs = [name for kind, name in members if kind == "conv"]
    if not convs or len(members) < 2:
        return None
    main = max(convs, key=lambda c: g.modules[c].weight[0, 0].numel())
    mconv = g.modules[main]
    branches, ids = {}, {}
    for kind, name in members:
        if name == main:
            continue
        if kind == "conv":
            off = branch_offset(mconv, g.modules[name])
            if off is None:
                continue
            branches[name] = off
        else:
            centre = identity_centre(mconv)
            if centre is None:
                continue
            ids[name] = centre
    return Merge(main, branches, ids) if branches or ids else None
