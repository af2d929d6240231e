"""``inspect_model``: the norm map of a model as a plain dict, plus which recipes apply and why not.

>>> info = inspect_model("normsurgeon.testing:tiny_gpt2")
>>> info["placement"], info["recipes"]["rmsnorm"]["applies"]
('pre-ln', True)
"""
from __future__ import annotations

import copy

import torch

from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.io.loader import load_model
from normsurgeon.transforms.plan import refusal_reasons


def inspect_model(model: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """Load ``model`` and describe its norms, readers, writers, block placements and applicable recipes."""
    lm = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    work = copy.deepcopy(lm.model).to(torch.float64)
    nm = build_norm_map(work)
    recipes = {}
    for target in ("rmsnorm", "crmsnorm"):
        reasons = refusal_reasons(nm, target)
        recipes[target] = {"applies": not reasons, "exact": not reasons, "why_not": reasons}
    return {
        "model": model,
        "architecture": nm.model_class,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "converted": lm.converted,
        "hidden_size": nm.hidden_size,
        "placement": nm.placement,
        "norms": [{"name": n.name, "class": n.kind.class_name, "family": n.kind.family, "role": n.role,
                   "eps": n.kind.eps, "block": n.block, "readers": [r.name for r in n.readers],
                   "problems": n.problems, "keeps_affine": n.keep_affine} for n in nm.norms],
        "writers": [{"name": w.name, "kind": w.kind, "width": w.width} for w in nm.writers],
        "blocks": [{"name": b.name, "placement": b.placement, "norms": b.norms, "writers": b.writers}
                   for b in nm.blocks],
        "stream_problems": nm.stream_problems,
        "recipes": recipes,
    }
