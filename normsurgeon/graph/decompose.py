"""Linear decomposition of recorded tensors into residual-stream "atoms".

For every node of a ``DataflowGraph`` we compute the set of atoms (leaf-module outputs and parameters
read directly) whose sum it is, following only ops that keep a tensor a linear combination of its
inputs along the feature axis: add/sub, scaling by a scalar, views, dropout in eval, and concatenation
along a token axis. Anything else makes a node non-decomposable (None).

>>> import torch
>>> from normsurgeon.graph.trace import trace_dataflow
>>> class Two(torch.nn.Module):
...     def __init__(self):
...         super().__init__(); self.a = torch.nn.Linear(3, 3); self.b = torch.nn.Linear(3, 3)
...     def forward(self, x):
...         return self.a(x) + 2 * self.b(x)
>>> g = trace_dataflow(Two(), (torch.randn(1, 3),))
>>> sorted(g.nodes[i].target for i in decompose(g, set())[g.outputs[0]])
['a', 'b']
"""
from __future__ import annotations

import torch

from normsurgeon.graph.layer_scale import scaled_writer
from normsurgeon.graph.layouts import layout_of
from normsurgeon.graph.trace import DataflowGraph, Node

# Ops through which a tensor stays the same linear combination of atoms (feature axis untouched).
TRANSPARENT = {
    "view", "reshape", "flatten", "transpose", "permute", "contiguous", "to", "type", "float", "double",
    "half", "bfloat16", "clone", "expand", "expand_as", "squeeze", "unsqueeze", "__getitem__", "dropout",
    "detach", "movedim", "swapaxes", "unflatten", "alpha_dropout", "feature_alpha_dropout",
}
# Sums and means over token (or batch) axes: each output row is a linear combination of input rows.
TOKEN_REDUCTIONS = {"mean", "sum"}
ADD_OPS = _ADD = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"}
_SCALE = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__itruediv__", "neg"}
_CAT = {"cat", "concat", "concatenate"}

def _is_scalar_like(node: Node) -> bool:
    return len(node.shape) == 0 or all(s == 1 for s in node.shape)


def _is_row_factor(factor: Node, x: Node) -> bool:
    """``factor`` scales whole rows of ``x``: width 1 on the feature axis, no more dims than ``x``."""
    return bool(factor.shape) and bool(x.shape) and factor.shape[-1] == 1 and x.shape[-1] > 1 \
        and len(factor.shape) <= len(x.shape) and factor.kind != "param"


# Matrix products that apply a parameter read directly (fused MoE experts: a [E, d_ff, d] stack applied
# with a grouped matmul): the product is a residual writer whose output axis is an axis of the parameter.
PARAM_PRODUCTS = {"_grouped_mm", "bmm", "matmul", "mm", "__matmul__", "linear"}
_ZEROS = {"zeros_like", "zeros", "new_zeros"}  # an accumulator's start: the sum of no atoms
_INDEX_ADD = {"index_add", "index_add_"}  # acc.index_add_(dim, rows, src): acc plus src's rows


def param_product(graph: DataflowGraph, n: Node) -> tuple[str, int] | None:
    """(parameter name, its output axis) when ``n`` multiplies data by one parameter read directly and the
    output width matches exactly one axis of that parameter; else None."""
    if n.target not in PARAM_PRODUCTS or not n.shape:
        return None
    params = []
    for i in n.inputs:
        src = graph.nodes[i]
        while src.kind == "op" and src.target in TRANSPARENT and src.inputs:
            src = graph.nodes[src.inputs[0]]
        if src.kind == "param" and src.is_float:
            params.append(src)
    if len(params) != 1 or len(params[0].shape) < 2:  # one weight, no bias term
        return None
    p = params[0]
    axes = [k for k, size in enumerate(p.shape) if size == n.shape[-1]]
    return (p.target, axes[0]) if len(axes) == 1 else None


def decompose(graph: DataflowGraph, norm_names: set[str]) -> list[frozenset[int] | None]:
    """For each node: the set of atom node indices it is the sum of, or None if not linear."""
    terms: list[frozenset[int] | None] = []
    for n in graph.nodes:
        t: frozenset[int] | None = None
        if n.kind == "param" and n.is_float:
            t = frozenset([n.idx])
        elif n.kind == "module":
            mod = graph.modules[n.target]
            if isinstance(mod, (torch.nn.Dropout,)) and n.inputs:
                t = terms[n.inputs[0]]
            elif n.target in norm_names or layout_of(mod) is not None:
                t = frozenset([n.idx])
            elif scaled_writer(graph, n, terms) is not None:  # a layer-scale module on one writer
                t = frozenset([n.idx])
        elif n.kind == "op" and n.is_float:
            if n.target in _SCALE and scaled_writer(graph, n, terms):
                t = frozenset([n.idx])
            elif param_product(graph, n) is not None:
                t = frozenset([n.idx])
            else:
                t = _decompose_op(graph, n, terms)
        terms.append(t)
    return terms


def _decompose_op(graph: DataflowGraph, n: Node, terms: list) -> frozenset[int] | None:
    ins = n.inputs
    name = n.target
    if (name in TRANSPARENT or name in TOKEN_REDUCTIONS) and len(ins) >= 1:
        return terms[ins[0]] if feature_axis_kept(graph, n) else None
    if name in _ADD:
        if len(ins) == 2:
            a, b = terms[ins[0]], terms[ins[1]]
            return a | b if a is not None and b is not None else None
        if len(ins) == 1 and all(s == 0 for s in n.scalars if isinstance(s, (int, float))):
            return terms[ins[0]]
        return None
    if name in _SCALE:
        # Scaling by a scalar (a number, or a tensor with only unit dimensions) commutes with centring, and
        # so does scaling each row by its own factor (a factor of width 1 on the feature axis: MoE routing
        # weights), which keeps every row a combination of the same atoms.
        if len(ins) == 1:
            return terms[ins[0]]
        if len(ins) == 2:
            a, b = (graph.nodes[i] for i in ins)
            if _is_scalar_like(b) or _is_row_factor(b, a):
                return terms[ins[0]]
            if (_is_scalar_like(a) or _is_row_factor(a, b)) and name in ("mul", "mul_", "__mul__", "__rmul__"):
                return terms[ins[1]]
        return None
    if name in _ZEROS:
        return frozenset()
    if name in _INDEX_ADD:
        dim = next((a for a in n.scalars if isinstance(a, int) and not isinstance(a, bool)), n.kwargs.get("dim", 0))
        floats = [i for i in ins if graph.nodes[i].is_float]
        if len(floats) != 2 or dim % max(len(n.shape), 1) == len(n.shape) - 1:
            return None
        a, b = terms[floats[0]], terms[floats[1]]
        return a | b if a is not None and b is not None else None
    if name in _CAT:
        dim = n.kwargs.get("dim", next((s for s in n.scalars if isinstance(s, int)), 0))
        if dim in (-1, len(n.shape) - 1):
            return None
        parts = [terms[i] for i in ins]
        if any(p is None for p in parts):
            return None
        out: frozenset[int] = frozenset()
        for p in parts:
            out |= p
        return out
    return None


def feature_axis_kept(graph: DataflowGraph, n: Node) -> bool:
    """A transparent op must not slice or mix the feature axis (checked by the last-axis width); a
    token reduction (mean pooling) must name its dims, none of them the feature axis."""
    if n.target in TOKEN_REDUCTIONS:
        src = graph.nodes[n.inputs[0]]
        dims = n.kwargs.get("dim", next((a for a in n.scalars if isinstance(a, (int, tuple, list))
                                         and not isinstance(a, bool)), None))
        if dims is None or not src.shape or not n.shape:
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        last = len(src.shape) - 1
        return all(d % len(src.shape) != last for d in dims) and n.shape[-1] == src.shape[-1]
    if n.target != "__getitem__":
        return True
    src = graph.nodes[n.inputs[0]]
    return bool(src.shape) and bool(n.shape) and src.shape[-1] == n.shape[-1]
