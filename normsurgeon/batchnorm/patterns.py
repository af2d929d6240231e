"""Pair each BN unit with the layer it folds into, from the recorded dataflow only.

Backward fold (preferred): ``layer -> [view ops] -> unit``. Forward fold: ``unit -> [view ops] -> layer``.
A pair is accepted only if (1) both modules are called exactly once, (2) every tensor on the path has a
single consumer and is not a model output, (3) the unit's channel axis is the layer's channel axis after
following transposes/permutes/reshapes, (4) for a forward fold into a conv, the conv never reads padding
(or pads by reflection/replication, or the shift is zero), (5) the folded layer, run alone on a random
input of its traced shape, reproduces the layer and the unit together (a conv subclass whose forward
transforms its weight, e.g. weight standardization, does not). Anything else is left, with the reason.

>>> import torch
>>> from normsurgeon.batchnorm.units import AffineUnit
>>> in_shape, out = (2, 4, 3), (2, 3, 4)
>>> map_axis("transpose", in_shape, out, [1, 2], 1)
2
>>> map_axis("flatten", (2, 3, 4), (6, 4), [0, 1], 2)
1
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from normsurgeon.batchnorm.fold_math import F64, fold_into_consumer, fold_into_producer
from normsurgeon.batchnorm.units import AffineUnit
from normsurgeon.graph.trace import DataflowGraph, Node

_SWAPS = {"transpose", "swapaxes", "swapdims", "t"}
_RESHAPES = {"reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
             "contiguous", "clone", "detach"}


@dataclasses.dataclass
class Fold:
    """Fold ``unit`` into ``layer``: "producer" (the layer feeds the unit) or "consumer" (the unit feeds it)."""

    unit: str
    layer: str
    direction: str  # "producer" | "consumer"
    layout: str  # "conv" | "conv_transpose" | "linear"
    groups: int
    layer_in_shape: tuple[int, ...] | None = None  # the layer's traced input shape (for the local check)


def layout_of(m: torch.nn.Module) -> str | None:
    if isinstance(m, torch.nn.Linear):
        return "linear"
    if isinstance(m, _ConvTransposeNd):
        return "conv_transpose"
    if isinstance(m, _ConvNd):
        return "conv"
    return None


def map_axis(op: str, in_shape: tuple, out_shape: tuple, scalars: list, axis: int) -> int | None:
    """Where the channel axis ``axis`` of the input ends up in the output of a view-like op (None: lost)."""
    nd = len(in_shape)
    ints = [s for s in scalars if isinstance(s, int) and not isinstance(s, bool)]
    if op in _SWAPS:
        d0, d1 = (ints[0] % nd, ints[1] % nd) if op != "t" else (0, 1)
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if op == "permute":
        dims = [d % nd for d in ints[:nd]]
        return dims.index(axis) if axis in dims else None
    if op in _RESHAPES:
        c, inner = in_shape[axis], math.prod(in_shape[axis + 1:])
        for b in range(len(out_shape)):
            if out_shape[b] == c and math.prod(out_shape[b + 1:]) == inner:
                return b
    return None


_SHAPE_ONLY = {"reshape_as", "view_as", "expand_as", "type_as", "new_zeros", "new_ones", "new_empty", "zeros_like",
               "ones_like", "empty_like"}


def _sole_user(g: DataflowGraph, idx: int) -> Node | None:
    """The only consumer of node ``idx``'s values (uses of its shape/dtype alone do not count)."""
    users = [u for u in g.users.get(idx, []) if not (g.nodes[u].target in _SHAPE_ONLY and g.nodes[u].inputs[0] != idx
                                                     or g.nodes[u].target.endswith("_like"))]
    if len(set(users)) != 1 or idx in g.outputs:
        return None
    return g.nodes[users[0]]


def _layer_calls(g: DataflowGraph, name: str) -> int:
    return len(g.module_nodes(name))


def _padding_free(conv: _ConvNd) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding == "valid" or all(k == 1 for k in conv.kernel_size)
    return all(p == 0 for p in conv.padding)


def backward_fold(g: DataflowGraph, unit_node: Node, u: AffineUnit) -> Fold | str:
    """The producer fold for ``u``, or the reason there is none."""
    if len(unit_node.inputs) != 1:
        return "the unit reads more than one tensor"
    chain: list[Node] = []
    idx = unit_node.inputs[0]
    while g.nodes[idx].kind == "op" and (g.nodes[idx].target in _SWAPS | _RESHAPES | {"permute"}):
        chain.append(g.nodes[idx])
        idx = g.nodes[idx].inputs[0]
    prod = g.nodes[idx]
    if prod.kind != "module":
        return f"its input comes from {prod.kind} {prod.target or '?'!r}, not a conv/linear layer"
    mod = g.modules[prod.target]
    layout = layout_of(mod)
    if layout is None:
        return f"its input comes from {type(mod).__name__} {prod.target!r}, not a conv/linear layer"
    calls = _layer_calls(g, prod.target)
    if calls != 1:
        return f"{prod.target!r} is called {calls} times (a layer shared by several paths)"
    for n in [prod] + chain[::-1]:
        if _sole_user(g, n.idx) is None:
            return f"the output of {prod.target!r} is also used elsewhere"
    axis = len(prod.shape) - 1 if layout == "linear" else 1
    shape = prod.shape
    for n in chain[::-1]:
        axis = map_axis(n.target, shape, n.shape, n.scalars, axis) if axis is not None else None
        shape = n.shape
    if axis != u.axis:
        return (f"it normalizes axis {u.axis} of {tuple(u.in_shape or ())} but the features of {prod.target!r} "
                f"are on axis {axis}")
    return Fold(u.name, prod.target, "producer", layout, getattr(mod, "groups", 1), _in_shape(g, prod))


def forward_fold(g: DataflowGraph, unit_node: Node, u: AffineUnit) -> Fold | str:
    """The consumer fold for ``u``, or the reason there is none."""
    idx, axis, shape = unit_node.idx, u.axis, unit_node.shape
    while True:
        nxt = _sole_user(g, idx)
        if nxt is None:
            return "its output is used by several layers or is a model output"
        if nxt.kind == "op" and nxt.target in _SWAPS | _RESHAPES | {"permute"} and nxt.inputs[0] == idx:
            axis = map_axis(nxt.target, shape, nxt.shape, nxt.scalars, axis) if axis is not None else None
            idx, shape = nxt.idx, nxt.shape
            continue
        break
    if nxt.kind != "module":
        return f"its output goes to {nxt.target!r}, not a conv/linear layer"
    mod = g.modules[nxt.target]
    layout = layout_of(mod)
    if layout not in ("conv", "linear"):
        what = "a ConvTranspose (the shift does not reach every output position equally)" if layout else \
            type(mod).__name__
        return f"its output goes to {what} {nxt.target!r}"
    calls = _layer_calls(g, nxt.target)
    if calls != 1 or len(nxt.inputs) != 1:
        return f"{nxt.target!r} is called {calls} times (a layer shared by several paths)"
    want = len(shape) - 1 if layout == "linear" else 1
    if axis != want:
        return f"its channel axis lands on axis {axis} of the input of {nxt.target!r}, whose features are on axis {want}"
    if layout == "conv" and not _padding_free(mod) and mod.padding_mode == "zeros" and bool((u.t != 0).any()):
        return (f"the next conv {nxt.target!r} zero-pads its input (padding={mod.padding}): folding the shift "
                "would be wrong at the borders")
    return Fold(u.name, nxt.target, "consumer", layout, getattr(mod, "groups", 1), tuple(shape))


def _in_shape(g: DataflowGraph, node: Node) -> tuple[int, ...] | None:
    return tuple(g.nodes[node.inputs[0]].shape) if node.inputs else None


def local_check(layer: torch.nn.Module, f: Fold, u: AffineUnit) -> str | None:
    """Run the folded layer alone against the layer and the unit (float64, a random input of the layer's
    traced shape, batch 1); None if they agree, else the reason."""
    if f.layer_in_shape is None or u.s is None:
        return None
    shape = f.layer_in_shape if len(f.layer_in_shape) < 2 else (1,) + tuple(f.layer_in_shape[1:])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=F64)
    axis = len(shape) - 1 if f.layout == "linear" else 1
    try:
        work = copy.deepcopy(layer).to(F64)
        fn = fold_into_producer if f.direction == "producer" else fold_into_consumer
        w, b = fn(work.weight, work.bias, u.s, u.t, f.layout, f.groups)
        with torch.no_grad():
            if f.direction == "producer":
                y = work(x)
                ref = y * _bcast(u.s, y.dim(), axis) + _bcast(u.t, y.dim(), axis)
            else:
                ref = work(x * _bcast(u.s, x.dim(), axis) + _bcast(u.t, x.dim(), axis))
            work.weight.data = w
            work.bias = torch.nn.Parameter(b, requires_grad=False)
            got = work(x)
    except Exception as e:  # noqa: BLE001 - any failure means the fold is not proven
        return f"folding into {f.layer!r} could not be checked ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if got.shape != ref.shape or not bool(((got - ref).abs() <= 1e-9 * (1.0 + ref.abs().max())).all()):
        return (f"folding into {type(layer).__name__} {f.layer!r} does not reproduce it (its forward is not a plain "
                "conv/linear of its weight, e.g. weight standardization or its own padding)")
    return None


def _bcast(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def find_folds(g: DataflowGraph, units: dict[str, AffineUnit]) -> tuple[list[Fold], dict[str, str]]:
    """One fold per foldable unit, and ``{unit: reason}`` for the units left in place."""
    folds, left = [], {}
    taken: set[str] = set()
    for name, u in units.items():
        if u.reason is not None:
            left[name] = u.reason
            continue
        nodes = g.module_nodes(name)
        if len(nodes) != 1:
            left[name] = f"called {len(nodes)} times (shared by several paths)"
            continue
        back = backward_fold(g, nodes[0], u)
        if isinstance(back, Fold) and back.layer not in taken:
            back = local_check(g.modules[back.layer], back, u) or back
        if isinstance(back, Fold) and back.layer not in taken:
            folds.append(back)
            taken.add(back.layer)
            continue
        fwd = forward_fold(g, nodes[0], u)
        if isinstance(fwd, Fold):
            fwd = local_check(g.modules[fwd.layer], fwd, u) or fwd
        if isinstance(fwd, Fold):
            folds.append(fwd)
            continue
        left[name] = f"no exact fold: before it, {back}; after it, {fwd}"
    return folds, left
