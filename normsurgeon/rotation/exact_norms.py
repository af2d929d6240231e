"""Float64 checks past norms that compute in float32 whatever the model's dtype.

Several stock norm classes cast to float32 inside (``LlamaRMSNorm``, ``GemmaRMSNorm``, ``CohereLayerNorm``):
a float64 model then carries float32 round-off (about 6e-8) at every norm, so no float64 comparison of a
rotated model (whose stream differs from the source's by Q) can reach 1e-10, though the two compute the
same function exactly. ``swap_exact_norms`` replaces such modules, in source and output alike, by
``ExactNorm`` (the formula the norm was recognised by, in the input's dtype); norms that already compute
in float64 (``torch.nn.LayerNorm``, ``normsurgeon.modules.RMSNorm``) are left alone. Only for
verification: the written checkpoint is untouched.

>>> import torch, transformers as T
>>> m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
...     num_hidden_layers=1, num_attention_heads=2)).double()
>>> swap_exact_norms(m)
['model.layers.0.input_layernorm', 'model.layers.0.post_attention_layernorm', 'model.norm']
"""
from __future__ import annotations

import copy

import torch

from normsurgeon.graph.norm_kinds import NormKind, classify_norm
from normsurgeon.module_tree import set_module
from normsurgeon.modules import RMSNorm


class ExactNorm(torch.nn.Module):
    """``kind``'s formula computed in the input's dtype: LayerNorm / RMSNorm / offset (1+w) RMSNorm."""

    def __init__(self, kind: NormKind, weight: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.family, self.eps = kind.family, float(kind.eps or 0.0)
        self.offset = 1.0 if kind.family == "rmsnorm_offset" else float(kind.gain_offset)
        self.weight = torch.nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = torch.nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., d]
        if self.weight is not None:
            y = y * (self.weight + self.offset)
        return y + self.bias if self.bias is not None else y


def _formula_gap(module: torch.nn.Module, kind: NormKind) -> float:
    probe = copy.deepcopy(module).double()
    x = torch.randn(4, kind.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 0.7
    w = getattr(probe, kind.weight_attr, None) if kind.has_weight else None
    b = getattr(probe, kind.bias_attr, None) if kind.has_bias else None
    ref = ExactNorm(kind, w, b).double()
    with torch.no_grad():
        y, e = probe(x), ref(x)
    return float((y - e).abs().max() / e.abs().max().clamp_min(1e-30))


def swap_exact_norms(model: torch.nn.Module, names: list[str] | None = None, tol: float = 1e-13,
                     kinds: dict[str, NormKind] | None = None) -> list[str]:
    """Replace each token norm (of ``names``, or every one) that is not float64-exact by ``ExactNorm``;
    return the names replaced. Call it with the same ``names`` on both models of a comparison.

    ``kinds``: what the norm map found (name -> NormKind), for norms ``classify_norm`` cannot see alone
    (OLMo's parameter-free LayerNorm, a module around a functional call)."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if names is not None and name not in names:
            continue
        if type(mod) in (torch.nn.LayerNorm, torch.nn.RMSNorm, RMSNorm, ExactNorm):
            continue
        kind = (kinds or {}).get(name) or classify_norm(mod)
        if kind is None or not kind.is_token_norm or not kind.size:
            continue
        if names is None and _formula_gap(mod, kind) <= tol:
            continue
        w = getattr(mod, kind.weight_attr, None) if kind.has_weight else None
        b = getattr(mod, kind.bias_attr, None) if kind.has_bias else None
        dtype = next(iter(mod.parameters()), torch.zeros((), dtype=torch.get_default_dtype())).dtype
        set_module(model, name, ExactNorm(kind, w, b).to(dtype))
        swapped.append(name)
    return swapped


def exact_pair(a: torch.nn.Module, b: torch.nn.Module, nm=None) -> list[str]:
    """For a float64 comparison of ``a`` (the source) and ``b``: swap the norms of ``a`` that compute in
    float32, and the same names in ``b``; ``nm``: the source's NormMap (finds parameter-free norms)."""
    kinds = {n.name: n.kind for n in nm.norms} if nm is not None else None
    names = swap_exact_norms(a, kinds=kinds)
    if names:
        swap_exact_norms(b, names, kinds=kinds)
    return names
