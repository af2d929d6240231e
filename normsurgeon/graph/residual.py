"""The residual stream, read off the linear decomposition (``decompose.py``) of a traced graph: which
atoms write it (``find_stream_atoms``), where it is read raw, without a norm (``find_stream_problems``),
what makes a normalized sum impossible to follow (``opaque_terms``), and whether a norm normalizes
embedding lookups only (``lookups_only``). The norm map (``normmap.py``) classifies norms with them.
"""
from __future__ import annotations

import torch

from normsurgeon.graph.decompose import ADD_OPS, TRANSPARENT
from normsurgeon.graph.layouts import layout_of
from normsurgeon.graph.trace import DataflowGraph


def opaque_terms(graph: DataflowGraph, terms: list, token_norms: set[str]) -> list[str]:
    """What makes a normalized sum undecomposable: its non-linear or computed terms, described once each."""
    found: list[str] = []
    for n in graph.nodes:
        if not (n.kind == "module" and n.target in token_norms and n.inputs):
            continue
        i = n.inputs[0]
        while terms[i] is None and graph.nodes[i].kind == "op" and graph.nodes[i].target in TRANSPARENT \
                and graph.nodes[i].inputs:
            i = graph.nodes[i].inputs[0]
        node = graph.nodes[i]
        if terms[i] is None and node.kind == "op" and node.target in ADD_OPS:
            for j in node.inputs:
                if terms[j] is None:
                    what = describe_term(graph, j)
                    if what not in found:
                        found.append(what)
    return found


def describe_term(graph: DataflowGraph, i: int) -> str:
    """The op behind node ``i`` (past views and casts), with the parameters or buffers it reads."""
    src = graph.nodes[i]
    while src.kind == "op" and src.target in TRANSPARENT and src.inputs:
        src = graph.nodes[src.inputs[0]]
    reads = [graph.nodes[j].target for j in src.inputs if graph.nodes[j].kind == "param"]
    text = f"`{src.target}`" + (f" of `{reads[0]}`" if reads else "")
    return text + (f" in `{src.scope}`" if src.scope else "")


def find_stream_atoms(graph: DataflowGraph, terms: list, token_norms: set[str]) -> set[int]:
    """The atoms that write into a residual stream: those of every sum that a token norm reads, and of
    every sum that extends one of those (a stream goes on past its last norm). A sum nothing normalizes
    and that shares no atom with a stream is not a stream: a head's output plus a bias (ESM's
    ``decoder(x) + bias``, BART's ``final_logits_bias``) stays out of it."""
    atoms: set[int] = set()
    for n in graph.nodes:
        if n.kind == "module" and n.target in token_norms and n.inputs:
            t = terms[n.inputs[0]]
            if t is not None and len(t) >= 2:
                atoms |= t
    sums = [t for t in terms if t is not None and len(t) >= 2]
    grew = True
    while grew:
        grew = False
        for t in sums:
            if t & atoms and not t <= atoms:
                atoms |= t
                grew = True
    return atoms


def find_stream_problems(graph, terms, stream_atoms, is_stream, kinds) -> list[str]:
    """Places where the raw residual stream is read by something other than a norm or a further sum."""
    problems = []
    for n in graph.nodes:
        if not is_stream(n.idx):
            continue
        for u in graph.users.get(n.idx, []):
            user = graph.nodes[u]
            if user.kind == "op" and is_stream(u):  # a further sum or view of the stream
                continue
            if user.kind == "module" and user.target in kinds and kinds[user.target].is_token_norm:
                continue
            if user.kind == "module" and isinstance(graph.modules[user.target], torch.nn.Dropout):
                continue
            if shape_only(graph, u):
                continue
            where = user.target or user.kind
            src = graph.nodes[n.idx].target or f"node {n.idx}"
            problems.append(f"the residual stream (after `{src}`) is read by `{where}` without a norm")
        if n.idx in graph.outputs and len(terms[n.idx]) > 1:
            problems.append("the raw residual stream is a model output (no final norm)")
    return sorted(set(problems))


def lookups_only(graph: DataflowGraph, terms: list, in_idx: int, norm_idx: int) -> bool:
    """The norm's input is a sum of embedding lookups and parameters, none of them summed with its output."""
    atoms = terms[in_idx] or frozenset()
    lookups = bool(atoms) and all(
        graph.nodes[a].kind == "param" or
        layout_of(graph.modules.get(graph.nodes[a].target, torch.nn.Identity())) == "embedding" for a in atoms)
    if not lookups:
        return False
    return not any(t is not None and norm_idx in t and t & atoms for t in terms)


def shape_only(graph: DataflowGraph, idx: int) -> bool:
    """A read whose values are never used: it only reaches embedding lookups, which cannot take float
    values as indices (mBART's positions module is handed ``inputs_embeds[..., -1]`` for its shape)."""
    users = graph.users.get(idx, [])
    return bool(users) and graph.nodes[idx].is_float and all(
        graph.nodes[u].kind == "module" and layout_of(graph.modules[graph.nodes[u].target]) == "embedding"
        for u in users)
