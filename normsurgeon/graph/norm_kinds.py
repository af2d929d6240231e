"""Recognise normalization modules by what they compute, not by their class name.

``classify_norm`` returns a ``NormKind`` for LayerNorm, RMSNorm, offset ``(1+w)`` RMSNorm, BatchNorm,
GroupNorm and any custom leaf module whose outputs match one of those formulas on a random probe.

>>> import torch
>>> classify_norm(torch.nn.LayerNorm(8)).family
'layernorm'
>>> classify_norm(torch.nn.Linear(8, 8)) is None
True
"""
from __future__ import annotations

import copy
import dataclasses

import torch

_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")


@dataclasses.dataclass(frozen=True)
class NormKind:
    """What a norm module computes.

    family: "layernorm" (centre + scale), "rmsnorm" (scale only, gain w), "rmsnorm_offset" (gain 1+w),
    "batchnorm", "groupnorm". ``size`` is the normalized (last-axis) width for layer/RMS norms.
    """

    family: str
    size: int | None
    eps: float | None
    has_weight: bool
    has_bias: bool
    class_name: str
    weight_attr: str = "weight"  # attribute names of the gain and shift parameters
    bias_attr: str = "bias"
    gain_offset: float = 0.0  # 1.0 when the gain is (1 + w) (Nemotron's LayerNorm1P; rmsnorm_offset is Gemma's)

    @property
    def is_token_norm(self) -> bool:
        """True for norms that normalize each token's feature vector (LN / RMS families)."""
        return self.family in ("layernorm", "rmsnorm", "rmsnorm_offset")


def _eps_of(module: torch.nn.Module) -> float | None:
    for attr in _EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _own_1d_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 1}


def classify_norm(module: torch.nn.Module) -> NormKind | None:
    """Return the NormKind of ``module``, or None if it is not a normalization layer."""
    name = type(module).__name__
    if isinstance(module, torch.nn.modules.batchnorm._NormBase):
        return NormKind("batchnorm", module.num_features, module.eps, module.weight is not None,
                        module.bias is not None, name)
    if isinstance(module, torch.nn.GroupNorm):
        return NormKind("groupnorm", module.num_channels, module.eps, module.weight is not None,
                        module.bias is not None, name)
    if isinstance(module, torch.nn.LayerNorm) and type(module) is not torch.nn.LayerNorm \
            and len(module.normalized_shape) == 1 and module.weight is not None:
        # A subclass may compute something else with the same parameters (Nemotron: gain 1 + w): probe it.
        return _probe_roles(module, module.weight, getattr(module, "bias", None))
    if isinstance(module, torch.nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return NormKind("layernorm", None, module.eps, module.weight is not None,
                            module.bias is not None, name)
        return NormKind("layernorm", module.normalized_shape[0], module.eps, module.weight is not None,
                        getattr(module, "bias", None) is not None, name)
    if isinstance(module, torch.nn.RMSNorm) and type(module) is not torch.nn.RMSNorm \
            and len(module.normalized_shape) == 1 and module.weight is not None:
        # A subclass may hold a shift or a (1 + w) gain (normsurgeon.modules.RMSNorm): probe it.
        return _probe_roles(module, module.weight, getattr(module, "bias", None))
    if isinstance(module, torch.nn.RMSNorm):
        size = module.normalized_shape[0] if len(module.normalized_shape) == 1 else None
        eps = module.eps if module.eps is not None else None
        return NormKind("rmsnorm", size, eps, module.weight is not None, False, name)
    if next(iter(module.children()), None) is not None:
        return None
    params = _own_1d_params(module)
    sizes = {p.numel() for p in params.values()}
    if not params or len(params) > 2 or len(sizes) != 1 or len(params) != len(dict(module.named_parameters())):
        return None
    return _probe(module, params)


def _probe(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> NormKind | None:
    """Compare the module's output on a random input with each candidate formula.

    The gain/shift roles of the (at most two) 1-D parameters are tried both ways unless they are
    called ``weight`` and ``bias``.
    """
    names = list(params)
    if set(names) == {"weight", "bias"}:
        orders = [("weight", "bias")]
    elif len(names) == 2:
        orders = [(names[0], names[1]), (names[1], names[0])]
    else:
        orders = [(names[0], None)]
    for w_name, b_name in orders:
        kind = _probe_roles(module, params[w_name], params[b_name] if b_name else None)
        if kind is not None:
            w_attr = _attr_for(module, params[w_name], w_name)
            b_attr = _attr_for(module, params[b_name], b_name) if b_name else "bias"
            return dataclasses.replace(kind, weight_attr=w_attr, bias_attr=b_attr)
    return None


def _attr_for(module: torch.nn.Module, param: torch.Tensor, default: str) -> str:
    """Prefer the conventional attribute name when it aliases the same parameter."""
    for conventional in ("weight", "bias"):
        if getattr(module, conventional, None) is param:
            return conventional
    return default


def _probe_roles(module: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> NormKind | None:
    d = weight.numel()
    eps = _eps_of(module)
    probe = copy.deepcopy(module).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, d, generator=gen, dtype=torch.float64) * 3.0 + 0.7  # [6, d], non-zero mean
    try:
        with torch.no_grad():
            y = probe(x)
    except Exception:  # not callable on a plain [N, d] tensor: not a token norm we understand
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    w = weight.detach().to(torch.float64)
    b = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(w)
    e = eps if eps is not None else 0.0
    centred = x - x.mean(-1, keepdim=True)
    ln = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + e) * w + b
    rms_unit = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + e)
    unit_ln = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + e)
    candidates = [
        ("layernorm", ln, 0.0),
        ("layernorm", unit_ln * (1.0 + w) + b, 1.0),
        ("rmsnorm", rms_unit * w + b, 0.0),
        ("rmsnorm_offset", rms_unit * (1.0 + w) + b, 0.0),
    ]
    scale = y.abs().max().clamp_min(1e-12)
    for family, expected, offset in candidates:
        if ((y - expected).abs().max() / scale) < 1e-4:
            return NormKind(family, d, eps, True, bias is not None, type(module).__name__, gain_offset=offset)
    return None
