"""RepBN and the progressive LayerNorm -> RepBN blend (SLAB ``RepBN`` / ``LinearNorm``).

``RepBN(x) = BN(x) + eta * x`` with BatchNorm over the feature (last) axis of token tensors [..., d]:
statistics over every other axis (batch and tokens). ``eta`` is one learned scalar (SLAB's ``alpha``).
In eval mode RepBN is a per-channel affine ``s * x + t`` with
``s = gamma / sqrt(var + eps) + eta`` and ``t = beta - gamma * mean / sqrt(var + eps)``.

``PRepBN`` holds the original norm and a RepBN. In training it returns
``lam * norm(x) + (1 - lam) * RepBN(x)`` with the blend weight ``lam`` (a buffer set by the schedule;
``lam = 1`` runs only the norm, so BN statistics are not touched during the warm-up). In eval mode it
always returns ``RepBN(x)``, as SLAB does.

>>> torch.manual_seed(0) and None
>>> rep = RepBN(4).double().train()
>>> _ = rep(torch.randn(3, 5, 4, dtype=torch.float64))  # batch statistics over 3 x 5 tokens
>>> rep = rep.eval(); s, t = rep.affine(); x = torch.randn(2, 4, dtype=torch.float64)
>>> torch.allclose(rep(x), x * s + t)
True
"""
from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-5


class RepBN(nn.Module):
    """``BN(x) + eta * x`` over the last axis of ``x`` [..., d]."""

    def __init__(self, size: int, eps: float = BN_EPS, momentum: float | None = 0.1, eta: float = 0.0):
        super().__init__()
        self.size = size
        self.bn = nn.BatchNorm1d(size, eps=eps, momentum=momentum)
        self.eta = nn.Parameter(torch.full((1,), float(eta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., d]
        y = self.bn(x.reshape(-1, self.size)).view(x.shape)  # BN1d on [N*T, d]: stats over batch and tokens
        return y + self.eta * x

    @torch.no_grad()
    def affine(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) [d] with ``RepBN(x) = s * x + t`` in eval mode, computed in ``dtype`` (float64 by default)."""
        bn = self.bn
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("RepBN without running statistics (track_running_stats=False) is not an affine map")
        inv = 1.0 / torch.sqrt(bn.running_var.to(dtype) + bn.eps)  # [d]
        gamma = bn.weight.to(dtype) if bn.weight is not None else torch.ones_like(inv)
        beta = bn.bias.to(dtype) if bn.bias is not None else torch.zeros_like(inv)
        s = gamma * inv + self.eta.to(dtype)
        t = beta - gamma * bn.running_mean.to(dtype) * inv
        return s, t


class PRepBN(nn.Module):
    """The original token norm blended with RepBN; eval mode is RepBN alone."""

    def __init__(self, norm: nn.Module, size: int, eta: float = 0.0, eps: float = BN_EPS, momentum: float | None = 0.1,
                 init_from_norm: bool = True):
        super().__init__()
        self.norm = norm
        self.repbn = RepBN(size, eps=eps, momentum=momentum, eta=eta)
        p = next(iter(norm.parameters()), None)
        if p is not None:
            self.repbn.to(device=p.device, dtype=p.dtype)
        if init_from_norm:  # start BN's affine at the norm's gain and shift
            with torch.no_grad():
                w, b = _norm_affine(norm)
                if w is not None:
                    self.repbn.bn.weight.copy_(w)
                if b is not None:
                    self.repbn.bn.bias.copy_(b)
        self.register_buffer("blend", torch.ones((), dtype=torch.float32))

    def set_blend(self, lam: float) -> None:
        self.blend.fill_(float(lam))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.repbn(x)
        lam = float(self.blend)
        if lam >= 1.0:
            return self.norm(x)
        if lam <= 0.0:
            return self.repbn(x)
        return lam * self.norm(x) + (1.0 - lam) * self.repbn(x)


def _norm_affine(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The effective gain and shift of a token norm (``1 + w`` for offset RMSNorms), if it has them."""
    from normsurgeon.graph.norm_kinds import classify_norm

    kind = classify_norm(norm)
    if kind is None:
        return None, None
    w = getattr(norm, kind.weight_attr, None) if kind.has_weight else None
    b = getattr(norm, kind.bias_attr, None) if kind.has_bias else None
    if isinstance(w, torch.Tensor) and kind.family == "rmsnorm_offset":
        w = 1.0 + w
    return (w.detach() if isinstance(w, torch.Tensor) else None, b.detach() if isinstance(b, torch.Tensor) else None)


def prepbn_modules(model: nn.Module) -> dict[str, PRepBN]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PRepBN)}


def set_blend(model: nn.Module, lam: float) -> None:
    for m in prepbn_modules(model).values():
        m.set_blend(lam)
