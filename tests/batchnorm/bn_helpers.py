"""Shared helpers: randomised BN statistics/affine and the output errors of both folded forms.

Default-initialised BNs (mean 0, var 1, weight 1, bias 0) hide folding bugs, so every test model goes
through ``randomise``. Tolerances: float64 max|delta| <= 1e-10; float32 max|delta| <= 1e-4 * max|ref|.
"""
from __future__ import annotations

import torch

from normsurgeon.batchnorm.fold import copy_f64

from normsurgeon.batchnorm.units import is_bn_like

TOL64 = 1e-10
TOL32_REL = 1e-4


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random running stats and affine on every BN-like module, random biases elsewhere; eval mode."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(t, lo, hi):
        return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(t.dtype)

    with torch.no_grad():
        for m in model.modules():
            if is_bn_like(m):
                for key, lo, hi in (("running_mean", -0.5, 0.5), ("running_var", 0.3, 2.0),
                                    ("weight", 0.5, 1.5), ("bias", -0.3, 0.3)):
                    t = getattr(m, key, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.copy_(rnd(t, lo, hi))
            elif isinstance(getattr(m, "bias", None), torch.Tensor) and m.bias.dim() == 1:
                m.bias.copy_(rnd(m.bias, -0.1, 0.1))
    return model.eval()


def _out(o):
    if isinstance(o, torch.Tensor):
        return o
    for attr in ("logits", "last_hidden_state", "pooler_output"):
        if isinstance(getattr(o, attr, None), torch.Tensor):
            return getattr(o, attr)
    return o[0]


def fold_errors(model: torch.nn.Module, result, args: tuple, kwargs: dict | None = None) -> dict:
    """max|delta| of deploy64 vs the source in float64, and of stock/deploy vs the source in its dtype."""
    kwargs = kwargs or {}
    to64 = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    with torch.no_grad():
        ref64 = _out(copy_f64(model)(*map(to64, args), **{k: to64(v) for k, v in kwargs.items()}))
        d64 = _out(result.deploy64(*map(to64, args), **{k: to64(v) for k, v in kwargs.items()}))
        ref = _out(model(*args, **kwargs))
        stock = _out(result.stock(*args, **kwargs))
        dep = _out(result.deploy(*args, **kwargs))
    scale = ref.abs().max().item()
    assert scale > 0, "bad test setup: output is all zeros"
    return {"f64": (d64 - ref64).abs().max().item(),
            "stock_rel": (stock - ref).abs().max().item() / scale,
            "deploy_rel": (dep - ref).abs().max().item() / scale}


def assert_equivalent(model, result, args, kwargs=None) -> dict:
    e = fold_errors(model, result, args, kwargs)
    assert e["f64"] <= TOL64, e
    assert e["stock_rel"] <= TOL32_REL and e["deploy_rel"] <= TOL32_REL, e
    return e


def actions(result) -> dict[str, str]:
    return {e["name"]: e["action"] for e in result.entries}
