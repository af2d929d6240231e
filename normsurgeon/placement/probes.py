"""The anatomy's two probe forwards (``anatomy.find_anatomy`` runs them after the trace):

- ``probe_fused``: which output channels of a fused q/k/v projection are which q, k and v heads;
- ``check_residuals``: whether each block adds its sublayers' outputs to the stream with coefficient 1
  (the residual rewrites of ``runtime.py`` rely on it).
"""
from __future__ import annotations

import collections

import torch

from normsurgeon.graph.anatomy import ROLES
from normsurgeon.graph.layouts import layout_of
from normsurgeon.graph.probe import capture, decode_channels, first_tensor, occurrence
from normsurgeon.graph.trace import DataflowGraph
from normsurgeon.placement.parts import Block


def probe_fused(model, graph: DataflowGraph, ex: dict, blocks: list[Block], tokens: int) -> None:
    """Map each fused projection's output channels to q / k / v heads: its output is replaced by
    ``s * (c + 1)`` and ``s * (c + 1.5)`` (c = channel) and read back at the attention op at position 0."""
    want: dict[str, set[int]] = collections.defaultdict(set)
    where: dict[tuple[int, str], tuple[str, int, int]] = {}
    fused_mods = set()
    for b in blocks:
        a = b.attention
        for role, (op, j, _) in a._graph_qkv.items():
            if list(a.proj.values()).count(a.proj[role]) > 1:
                name, k = occurrence(graph, op)
                want[name].add(k)
                where[(b.index, role)] = (name, k, j)
                fused_mods.add(a.proj[role])
    dtype = next(model.parameters()).dtype
    cast = dtype not in (torch.float32, torch.float64)
    if cast:  # half / bfloat16 -> float32 -> back is lossless; channel numbers need the mantissa
        model.to(torch.float32)
    try:
        runs = []
        for shift in (1.0, 1.5):
            def index(mod, args, out, shift=shift):
                c = torch.arange(out.shape[-1], dtype=out.dtype, device=out.device) + shift
                return c.expand(out.shape).clone()
            runs.append(capture(model, ex, want, {m: index for m in fused_mods}))
    except Exception as e:  # noqa: BLE001 - a model the probe cannot run: fused QK-norm is refused with the reason
        for b in blocks:
            b.attention.problem = f"the fused q/k/v probe failed ({type(e).__name__})"
        return
    finally:
        if cast:
            model.to(dtype)
    for b in blocks:
        a = b.attention
        chans: dict[str, list[list[int]]] = {}
        for role in ROLES:
            if (b.index, role) not in where:
                continue
            name, k, j = where[(b.index, role)]
            try:
                x1, x2 = runs[0][(name, k)][j], runs[1][(name, k)][j]
            except (KeyError, IndexError):
                a.problem = f"the attention op of `{a.scope}` was not seen in the probe"
                break
            heads = decode_channels(x1.double(), x2.double(), a.head_dims[role], tokens)
            if heads is None:
                a.problem = (f"the channels of the fused projection `{a.proj[role]}` could not be mapped to "
                             f"{role} heads (the attention transforms them before the attention op)")
                break
            chans[role] = heads
        else:
            mod = model.get_submodule(a.proj["q"])
            width = int(mod.weight.shape[1] if layout_of(mod) == "conv1d" else mod.weight.shape[0])
            fused_roles = [r for r in ROLES if r in chans]
            flat = [c for r in fused_roles for h in chans[r] for c in h]
            if len(flat) != len(set(flat)) or set(flat) != set(range(width)):
                a.problem = f"the q/k/v heads found in `{a.proj['q']}` do not partition its {width} outputs"
            else:
                a.channels = chans


@torch.no_grad()
def check_residuals(model, ex: dict, blocks: list[Block], final: str) -> None:
    """Each group's output must be its input plus its writers' outputs (coefficient 1): the residual
    rewrites (Post-LN, DeepNorm, HybridNorm, embedding norm) replace a writer's output by ``new - x``."""
    from normsurgeon.dtype_context import default_dtype_for

    seen: dict[str, torch.Tensor] = {}
    handles = []

    def grab_in(name):
        def hook(mod, args):
            seen.setdefault("in:" + name, args[0].detach().double().clone())
        return hook

    def grab_out(name):
        def hook(mod, args, out):
            seen.setdefault("out:" + name, first_tensor(out).detach().double().clone())
        return hook

    firsts = [g[0].norm for b in blocks for g in b.groups] + [final]
    for n in dict.fromkeys(firsts):
        handles.append(model.get_submodule(n).register_forward_pre_hook(grab_in(n)))
    for b in blocks:
        for s in b.sublayers:
            handles.append(model.get_submodule(s.output).register_forward_hook(grab_out(s.output)))
    try:
        with default_dtype_for(model):
            model(**ex)
    finally:
        for h in handles:
            h.remove()
    p = next(model.parameters(), None)
    eps = max(torch.finfo(p.dtype).eps if p is not None and p.is_floating_point() else 1e-7, 1.2e-7)
    k = 0
    for b in blocks:
        for g in b.groups:
            k += 1
            x, nxt = seen.get("in:" + g[0].norm), seen.get("in:" + firsts[k])
            ys = [seen.get("out:" + s.output) for s in g]
            if x is None or nxt is None or any(y is None for y in ys) or any(y.shape != x.shape for y in ys):
                b.unit_residual, b.residual_problem = False, "its residual add could not be observed"
                continue
            # element by element, against the rounding of the model's own sum (bfloat16 checkpoints too)
            scale = x.abs() + sum(y.abs() for y in ys) + 1e-30
            if float(((nxt - x - sum(ys)).abs() / scale).max()) > 8 * eps:
                b.unit_residual = False
                b.residual_problem = (f"block `{b.name}` does not add its sublayers' outputs to the stream as they "
                                      f"are (scaled or gated residual)")
