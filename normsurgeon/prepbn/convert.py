"""Find the norms PRepBN replaces (from the real dataflow) and swap them for ``PRepBN`` modules.

A model qualifies when it is a Pre-LN transformer: every residual-stream norm is a ``pre`` norm (read by
a block's first linear layers) or the ``final`` norm (read by the head), each read only by linear
layers (``nn.Linear``, GPT-2 ``Conv1D``) so that the eval-mode RepBN affine can be folded into them.
Post-LN, sandwich (Peri-LN) and embedding norms, norms whose output reaches anything but a linear
layer, and final norms whose output is the model output are refused (UnsupportedModel, exit 4).

>>> import transformers as T
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
...                                     bos_token_id=0, eos_token_id=0))
>>> sites = find_sites(m)
>>> [(s.name, s.role, [r for r, _ in s.readers]) for s in sites]  # doctest: +NORMALIZE_WHITESPACE
[('transformer.h.0.ln_1', 'pre', ['transformer.h.0.attn.c_attn']),
 ('transformer.h.0.ln_2', 'pre', ['transformer.h.0.mlp.c_fc']), ('transformer.ln_f', 'final', ['lm_head'])]
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.prepbn.repbn import PRepBN
from normsurgeon.module_tree import set_module

FAMILIES = ("layernorm", "rmsnorm", "rmsnorm_offset")


@dataclasses.dataclass
class Site:
    name: str
    role: str  # "pre" | "final"
    family: str
    size: int
    readers: list[tuple[str, str]]  # (module name, layout "linear" | "conv1d")


def find_sites(model: torch.nn.Module, example: dict[str, Any] | None = None) -> list[Site]:
    """The norms to replace, or UnsupportedModel naming the first reason the model does not qualify."""
    try:
        nm = build_norm_map(model, example)
    except UnsupportedModel:
        raise
    except Exception as e:  # noqa: BLE001 - a model the tracer cannot run
        raise UnsupportedModel(f"cannot trace {type(model).__name__} to find its norms: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    cls = type(model).__name__
    others = [n for n in nm.residual_norms if n.role not in ("pre", "final")]
    if others:
        n = others[0]
        what = {"post": "a Post-LN norm (its output is the residual stream)",
                "output": "a sandwich/Peri-LN norm on a sublayer output",
                "embedding": "an embedding norm"}.get(n.role, f"a {n.role} norm")
        raise UnsupportedModel(f"{cls} is not a Pre-LN transformer: `{n.name}` is {what}; prepbn needs every "
                               "residual norm to feed linear layers")
    chosen = nm.by_role("pre", "final")
    if not chosen:
        raise UnsupportedModel(f"{cls} has no Pre-LN norms (no LayerNorm/RMSNorm reads a residual stream); "
                               "prepbn needs a Pre-LN transformer")
    sites, seen_readers = [], {}
    for n in chosen:
        if n.kind.family not in FAMILIES or n.kind.size is None:
            raise UnsupportedModel(f"`{n.name}` ({n.kind.class_name}) is not a LayerNorm/RMSNorm over the last axis")
        if n.problems or n.keep_affine:
            raise UnsupportedModel(f"`{n.name}` cannot be folded after fine-tuning: {(n.problems + n.keep_affine)[0]}")
        if n.reads_output or not n.readers:
            raise UnsupportedModel(f"the output of `{n.name}` is a model output, not read by a linear layer; "
                                   "use the model with its head (e.g. *ForImageClassification, *LMHeadModel)")
        for r in n.readers:
            if r.name in seen_readers:
                raise UnsupportedModel(f"`{r.name}` reads both `{seen_readers[r.name]}` and `{n.name}`")
            seen_readers[r.name] = n.name
        sites.append(Site(n.name, n.role, n.kind.family, int(n.kind.size), [(r.name, r.layout) for r in n.readers]))
    return sites


def install_prepbn(model: torch.nn.Module, sites: list[Site], eta: float = 0.0,
                   momentum: float | None = 0.1) -> dict[str, PRepBN]:
    """In place: wrap every site's norm in a ``PRepBN`` (blend weight 1: the model is unchanged in training)."""
    out = {}
    for s in sites:
        old = model.get_submodule(s.name)
        new = PRepBN(old, s.size, eta=eta, momentum=momentum)
        set_module(model, s.name, new)
        out[s.name] = new
    return out
