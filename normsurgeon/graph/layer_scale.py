"""Layer scale: a per-channel gain on a sublayer's output just before the residual add (CaiT, BEiT,
DINOv2, Data2Vec-Vision): ``x = x + gamma * W(h)``, gamma of shape [d].

``gamma * (W h + b)`` is still one linear writer, ``(diag(gamma) W) h + gamma * b``, so the norm map
treats the product as that writer with a ``scale`` (the parameter name); centring folds gamma into
the writer first and sets it to 1 (exact; the layer-scale parameter stays, so stock classes load it).

Found from the dataflow, by behaviour: an elementwise multiply of a single linear writer's output by a
1-D parameter of the feature width (read directly, BEiT) or a parameter-only leaf module that computes
exactly ``x * p`` (DINOv2's ``Dinov2LayerScale``), each used once.

>>> class Scaled(torch.nn.Module):
...     def __init__(self):
...         super().__init__(); self.fc = torch.nn.Linear(4, 4); self.gamma = torch.nn.Parameter(torch.rand(4))
...     def forward(self, x):
...         return x + self.gamma * self.fc(x)
>>> from normsurgeon.graph.trace import trace_dataflow
>>> from normsurgeon.graph.decompose import decompose
>>> g = trace_dataflow(Scaled(), (torch.randn(2, 4),))
>>> terms = decompose(g, set())
>>> [scaled_writer(g, n, terms) for n in g.nodes if n.target == "mul"]
[(1, 'gamma')]
"""
from __future__ import annotations

import weakref

import torch

from normsurgeon.graph.layouts import layout_of

_MUL = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
_WRITER_LAYOUTS = ("linear", "conv1d")
_probe_cache: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


def scale_module_param(module: torch.nn.Module) -> str | None:
    """The parameter name if ``module`` has exactly one 1-D float parameter p, no children and no
    buffers, and computes ``x * p`` (checked on a random input); else None."""
    if module in _probe_cache:  # keyed by the module itself: ids are reused once a module is freed
        return _probe_cache[module]
    result = None
    params = list(module.named_parameters(recurse=False))
    if len(params) == 1 and params[0][1].dim() == 1 and params[0][1].is_floating_point() \
            and next(iter(module.children()), None) is None and not list(module.buffers(recurse=False)):
        name, p = params[0]
        x = torch.randn(2, 3, p.shape[0], dtype=p.dtype, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                y = module(x)
            if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y, x * p, rtol=1e-6, atol=0):
                result = name
        except Exception:  # noqa: BLE001 - a module that does not take one tensor is not a layer scale
            result = None
    _probe_cache[module] = result
    return result


def scaled_writer(graph, node, terms) -> tuple[int, str] | None:
    """(writer node index, qualified scale-parameter name) when ``node`` is a layer scale applied to a
    single linear writer, else None. ``terms``: the decomposition so far (``decompose.py``)."""
    ins = node.inputs
    if node.kind == "op" and node.target in _MUL and len(ins) == 2:
        a, b = (graph.nodes[i] for i in ins)
        x, p = (a, b) if b.kind == "param" else (b, a)
        if p.kind != "param" or len(p.shape) != 1 or not x.shape or x.shape[-1] != p.shape[0]:
            return None
        scale = p.target
        used = [n for n in graph.nodes if n.kind == "param" and n.target == scale]
        if len(used) != 1 or len(graph.users.get(used[0].idx, [])) != 1:
            return None  # a shared gain would change its other uses
    elif node.kind == "module" and len(ins) == 1:
        mod = graph.modules[node.target]
        pname = scale_module_param(mod)
        if pname is None or len(graph.module_nodes(node.target)) != 1:
            return None
        x, scale = graph.nodes[ins[0]], f"{node.target}.{pname}"
    else:
        return None
    atoms = terms[x.idx]
    if atoms is None or len(atoms) != 1:
        return None
    (w,) = atoms
    wn = graph.nodes[w]
    if wn.kind != "module" or layout_of(graph.modules[wn.target]) not in _WRITER_LAYOUTS \
            or len(graph.module_nodes(wn.target)) != 1:
        return None
    if not _only_feeds(graph, terms, w, node.idx):
        return None
    return w, scale


def _only_feeds(graph, terms, atom: int, target: int) -> bool:
    """Every use of the writer's output (through views, dropout) leads to ``target`` and nowhere else."""
    chain = {i for i, t in enumerate(terms) if t is not None and t == frozenset([atom]) and i <= target}
    for i in chain:
        for u in graph.users.get(i, []):
            if u != target and u not in chain:
                return False
    return True
