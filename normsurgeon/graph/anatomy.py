"""Dataflow helpers for reading a model's anatomy from its traced graph (``trace.py``), without module
names: where the attention ops are and which nodes are their query, key and value inputs, what a node
reaches without crossing the residual stream, a node's ancestors, and the dropout on a writer's path to
its residual add. ``normsurgeon.placement.anatomy`` builds blocks and sublayers from them.

>>> import torch, transformers as T
>>> from normsurgeon.graph.trace import trace_dataflow
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
>>> g = trace_dataflow(m, (), {"input_ids": torch.arange(7)[None]})
>>> cores = attention_cores(g)
>>> len(cores), sorted(qkv_nodes(g, cores[0]))
(1, ['k', 'q', 'v'])
"""
from __future__ import annotations

import torch

from normsurgeon.graph.trace import DataflowGraph

ATTENTION_OPS = ("scaled_dot_product_attention",)
SOFTMAX_OPS = ("softmax", "_softmax", "softmax_")
MATMUL_OPS = ("matmul", "bmm", "baddbmm", "einsum", "__matmul__", "__rmatmul__")
ROLES = ("q", "k", "v")


def residual_dropout(graph: DataflowGraph, idx: int) -> float:
    """The largest dropout probability on the single path from a writer's output towards its residual add."""
    p, i = 0.0, idx
    while len(graph.users.get(i, [])) == 1:
        u = graph.nodes[graph.users[i][0]]
        if u.kind == "module" and isinstance(graph.modules[u.target], torch.nn.Dropout):
            p = max(p, float(graph.modules[u.target].p))
        elif u.kind == "op" and u.target in ("dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout"):
            q = u.kwargs.get("p", next((x for x in u.scalars if isinstance(x, float)), 0.0))
            p = max(p, float(q))
        else:
            break
        i = u.idx
    return p


def reach_until(graph: DataflowGraph, start: int, stop: set[int]) -> set[int]:
    """Nodes reachable from ``start`` without going past a node of ``stop`` (the anatomy stops at the stream:
    its writers and stream norms)."""
    seen, stack = set(), [start]
    while stack:
        i = stack.pop()
        for u in graph.users.get(i, []):
            if u in seen:
                continue
            seen.add(u)
            if u not in stop:
                stack.append(u)
    return seen


def attention_cores(graph: DataflowGraph) -> list[int]:
    """Attention ops: ``scaled_dot_product_attention``, or a softmax between two matmuls (eager attention)."""
    out = []
    for n in graph.nodes:
        if n.kind == "op" and n.target in ATTENTION_OPS:
            out.append(n.idx)
        elif n.kind == "op" and n.target in SOFTMAX_OPS and qkv_nodes(graph, n.idx) is not None:
            out.append(n.idx)
    return out


def qkv_nodes(graph: DataflowGraph, core: int) -> dict[str, tuple[int, int, int]] | None:
    """role -> (op node, argument position, node) of the attention op's query, key and value inputs."""
    n = graph.nodes[core]
    if n.target in ATTENTION_OPS:
        if len(n.inputs) < 3:
            return None
        return {r: (core, j, n.inputs[j]) for j, r in enumerate(ROLES)}
    score = walk_to_matmul(graph, n.inputs[0], back=True) if n.inputs else None
    value = walk_to_matmul(graph, core, back=False)
    if score is None or value is None:
        return None
    s, v = graph.nodes[score], graph.nodes[value]
    if len(s.inputs) < 2 or len(v.inputs) < 2:
        return None
    j_v = 1 if core in ancestors(graph, v.inputs[0]) else 0
    return {"q": (score, len(s.inputs) - 2, s.inputs[-2]), "k": (score, len(s.inputs) - 1, s.inputs[-1]),
            "v": (value, j_v, v.inputs[j_v])}


def walk_to_matmul(graph: DataflowGraph, start: int, back: bool, limit: int = 8) -> int | None:
    """The nearest matmul-like op before (``back``: from the softmax's input) or after a softmax, through
    at most ``limit`` elementwise ops or dropout modules (never through another layer)."""
    frontier, seen = [start], set()
    for _ in range(limit):
        nxt = []
        for i in frontier:
            if i in seen:
                continue
            seen.add(i)
            nd = graph.nodes[i]
            if nd.kind == "op" and nd.target in MATMUL_OPS and (back or i != start):
                return i
            passable = nd.kind == "op" or (nd.kind == "module" and isinstance(graph.modules[nd.target],
                                                                               torch.nn.Dropout))
            if passable:
                nxt.extend(nd.inputs if back else graph.users.get(i, []))
        frontier = nxt
    return None


def ancestors(graph: DataflowGraph, start: int) -> set[int]:
    seen, stack = set(), [start]
    while stack:
        i = stack.pop()
        if i in seen or i < 0:
            continue
        seen.add(i)
        stack.extend(graph.nodes[i].inputs)
    return seen
