"""Runtime modules that converted models use: RMSNorm with optional affine, CRMSNorm, the centred
LayerNorm of baked embedding norms, and Dynamic Tanh (``DyT``, documented in ``normsurgeon.lnfree.dyt``).

``RMSNorm`` here keeps the parameter names of the LayerNorm it replaces (``weight``, ``bias``) so a
converted checkpoint has the same keys as its source and loads into the stock class as well.

Implementation per device (issue #2, planning measurement): on CPU, torch 2.13's ``F.rms_norm`` is a
composite that ran about 3x slower than the fused ``F.layer_norm`` kernel. On a zero-mean input both
compute the same function (the mean they subtract is zero up to round-off), and a converted model's
residual stream is zero-mean by construction, so ``impl="auto"`` uses the layer_norm kernel on CPU and
``F.rms_norm`` elsewhere. Use ``impl="rms"`` when fine-tuning (writers may drift off zero-mean).

>>> import torch
>>> x = torch.randn(2, 8, dtype=torch.float64); x = x - x.mean(-1, keepdim=True)
>>> n = RMSNorm(8, eps=1e-5)
>>> torch.allclose(n(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_IMPLS = ("auto", "rms", "layernorm-kernel")


class RMSNorm(torch.nn.RMSNorm):
    """y = x / sqrt(mean(x^2) + eps) * (weight + gain_offset) + bias, over the last axis (weight, bias
    optional). ``gain_offset=1`` keeps the stored weight's meaning of a ``(1 + w)`` source norm (Nemotron's
    LayerNorm1P), so the checkpoint still loads in the stock class.

    A subclass of ``torch.nn.RMSNorm`` (same ``normalized_shape``, ``eps``, ``weight``), so tools that
    accept a model's norms by type (quantizers' norm fusion) take it; it adds the optional ``bias`` and
    ``gain_offset`` and the per-device kernel choice. State-dict keys: ``weight`` and ``bias`` where set.
    ``elementwise_affine`` is True exactly when there is a ``weight``.

    >>> n = RMSNorm(4, 1e-6, weight=torch.full((4,), 2.0), bias=torch.zeros(4), impl="rms")
    >>> isinstance(n, torch.nn.RMSNorm), sorted(n.state_dict()), n.elementwise_affine
    (True, ['bias', 'weight'], True)
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> bool(torch.allclose(n.double()(x), 2 * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()))
    True
    """

    def __init__(self, size: int, eps: float, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, impl: str = "auto", gain_offset: float = 0.0):
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}")
        # elementwise_affine=False: torch registers ``weight`` as None; the given gain is set below, with
        # its own dtype and device (torch.nn.RMSNorm would make a float32 ones vector first).
        super().__init__(int(size), eps=float(eps), elementwise_affine=False)
        self.normalized_shape = (int(size),)
        self.eps = float(eps)
        self.impl = impl
        self.gain_offset = float(gain_offset)
        self.elementwise_affine = weight is not None
        self.weight = torch.nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = torch.nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_ln_kernel = self.impl == "layernorm-kernel" or (self.impl == "auto" and x.device.type == "cpu")
        gain = self.weight + self.gain_offset if self.gain_offset and self.weight is not None else self.weight
        if use_ln_kernel:
            return F.layer_norm(x, self.normalized_shape, gain, self.bias, self.eps)
        y = F.rms_norm(x, self.normalized_shape, gain, self.eps)
        return y + self.bias if self.bias is not None else y

    def reset_parameters(self) -> None:
        """Unit gain, zero shift (torch.nn.RMSNorm's reset, extended to the bias)."""
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if getattr(self, "bias", None) is not None:
            torch.nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        offset = f", gain_offset={self.gain_offset}" if self.gain_offset else ""
        return f"{self.normalized_shape[0]}, eps={self.eps}, impl={self.impl}, bias={self.bias is not None}{offset}"


class CRMSNorm(torch.nn.Module):
    """Compressed RMSNorm (Jiang et al. 2023) on the first d-1 coordinates of a zero-mean d-vector.

    The dropped coordinate is minus the sum of the others, so
    y = x' / sqrt((|x'|^2 + (sum x')^2) / d + eps), with x' of width d-1.

    >>> import torch
    >>> x = torch.randn(3, 6, dtype=torch.float64); x = x - x.mean(-1, keepdim=True)
    >>> full = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    >>> torch.allclose(CRMSNorm(6, 1e-6)(x[:, :5]), full[:, :5])
    True
    """

    def __init__(self, full_size: int, eps: float):
        super().__init__()
        self.full_size = int(full_size)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        # x: [..., d-1]; the missing coordinate is -sum(x), so sum of squares gains sum(x)^2.
        ms = (xf.pow(2).sum(-1, keepdim=True) + xf.sum(-1, keepdim=True).pow(2)) / self.full_size
        return (xf * torch.rsqrt(ms + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.full_size - 1} (of {self.full_size}), eps={self.eps}"


class CentredLayerNorm(torch.nn.Module):
    """LayerNorm whose output is centred: y = LN(x) * weight + bias - mean(LN(x) * weight + bias).

    An embedding norm over several tables (mBART: tokens + positions) writes the residual stream and
    cannot be baked into one table; centring its output makes the stream zero-mean (Pre-RMSNorm) and
    is exact because every reader of the stream is a norm that ignores the mean (a LayerNorm) or now
    an RMSNorm on a zero-mean input.

    >>> import torch
    >>> n = CentredLayerNorm(4, 1e-5, torch.rand(4), torch.rand(4))
    >>> bool(n(torch.randn(3, 4)).mean(-1).abs().max() < 1e-6)
    True
    """

    def __init__(self, size: int, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.normalized_shape = (size,)
        self.eps = float(eps)
        self.weight = torch.nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = torch.nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # [..., d]
        return y - y.mean(-1, keepdim=True)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, centred output"


class DyT(torch.nn.Module):
    """Dynamic Tanh: ``tanh(alpha * x) * weight + bias`` with a learnable scalar ``alpha`` (``lnfree/dyt.py``)."""

    def __init__(self, size: int, alpha0: float = 0.5, weight: bool = True, bias: bool = True,
                 weight_attr: str = "weight", bias_attr: str = "bias"):
        super().__init__()
        self.size = int(size)
        self.weight_attr, self.bias_attr = weight_attr, bias_attr
        self.alpha = torch.nn.Parameter(torch.full((), float(alpha0)))
        if weight:
            setattr(self, weight_attr, torch.nn.Parameter(torch.ones(size)))
        if bias:
            setattr(self, bias_attr, torch.nn.Parameter(torch.zeros(size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.alpha * x)  # [..., d]
        w, b = getattr(self, self.weight_attr, None), getattr(self, self.bias_attr, None)
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={float(self.alpha):.4g}"
