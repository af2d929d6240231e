"""The norm that is removed gradually: real per-token scale while live, a fixed scalar once fake.

``FixedScaleNorm`` replaces one LayerNorm / RMSNorm / offset-RMSNorm module in place and keeps its
parameters under the same attribute names, so the state-dict keys do not change (buffers are added).

- real:  LN ``(x - mean) / sqrt(var + eps) * g + b``; RMS ``x / sqrt(mean(x^2) + eps) * g`` (offset: 1+g;
  a LayerNorm with a ``1 + g`` gain, Nemotron's LayerNorm1P, has ``gain_offset = 1``)
- fixed: the same with the per-token scale replaced by the scalar ``sigma`` (Heimersheim 2024)
- dyt:   ``tanh(alpha * x) * g + b`` with a learnable scalar ``alpha`` (Zhu et al. 2025, DyT)

While the norm is live its scale is tracked by a moving average ``sigma_ema`` (train mode only; the
batch statistic is all-reduced across processes first, so every rank freezes the same value). When the
first of its paths is removed, ``sigma`` is frozen from the average and never changes again.

An attention input norm has two paths: the main output (q/k readers, and any other reader) and a
second output for the value readers (``split_v``). The value output of the latest call is left in
``v_output`` when the two paths differ; reader hooks (``sites.py``) consume it.

>>> import torch
>>> ln = torch.nn.LayerNorm(8).double()
>>> f = FixedScaleNorm.from_module(ln, "layernorm", 1e-5)
>>> x = torch.randn(3, 8, dtype=torch.float64)
>>> torch.allclose(f(x), ln(x))
True
>>> _ = f.sigma_ema.fill_(2.0); f.set_fake(True, True)  # freezes sigma = 2
>>> torch.allclose(f(x), (x - x.mean(-1, keepdim=True)) / 2.0 * ln.weight + ln.bias)
True
"""
from __future__ import annotations

import torch
import torch.distributed as dist

FAMILIES = ("layernorm", "rmsnorm", "rmsnorm_offset")
MODES = ("fixed", "dyt")


def per_token_sigma(x: torch.Tensor, family: str, eps: float) -> torch.Tensor:
    """The scale the real norm divides by, per token: [..., d] -> [...] (computed in float32 or wider)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if family == "layernorm":
        ms = xf.var(-1, unbiased=False)  # [...]
    else:
        ms = xf.pow(2).mean(-1)  # [...]
    return torch.sqrt(ms + eps)


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class FixedScaleNorm(torch.nn.Module):
    """A norm whose per-token scale can be swapped for a fixed scalar (or DyT), path by path."""

    def __init__(self, family: str, size: int, eps: float, weight: torch.nn.Parameter | None,
                 bias: torch.nn.Parameter | None, weight_attr: str = "weight", bias_attr: str = "bias",
                 mode: str = "fixed", momentum: float = 0.9, dyt_alpha0: float | None = 0.5,
                 gain_offset: float = 0.0):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.family, self.size, self.eps, self.mode = family, int(size), float(eps), mode
        self.momentum = float(momentum)
        self.dyt_alpha0 = dyt_alpha0  # None: initialise alpha from 1/sigma when the norm is removed
        self.weight_attr, self.bias_attr = weight_attr, bias_attr
        # The stored gain w means w + offset: 1 for rmsnorm_offset (Gemma), ``gain_offset`` otherwise.
        self.offset = 1.0 if family == "rmsnorm_offset" else float(gain_offset)
        if weight is not None:
            setattr(self, weight_attr, weight)  # the same Parameter object: optimizer state carries over
        if bias is not None:
            setattr(self, bias_attr, bias)
        dtype = weight.dtype if weight is not None else torch.float32
        self.register_buffer("sigma", torch.ones((), dtype=dtype))
        self.register_buffer("sigma_ema", torch.ones((), dtype=torch.float64))
        self.register_buffer("flags", torch.zeros(3, dtype=torch.uint8))  # fake_main, fake_v, frozen
        if mode == "dyt":
            self.alpha = torch.nn.Parameter(torch.full((), 0.5 if dyt_alpha0 is None else dyt_alpha0, dtype=dtype))
        self.split_v = False
        self.v_output: torch.Tensor | None = None
        self._calib: list[torch.Tensor] | None = None
        self._sync_flags()
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_flags())

    @classmethod
    def from_module(cls, module: torch.nn.Module, family: str, eps: float, weight_attr: str = "weight",
                    bias_attr: str = "bias", **kw) -> "FixedScaleNorm":
        w = getattr(module, weight_attr, None)
        b = getattr(module, bias_attr, None)
        size = w.numel() if w is not None else module.normalized_shape[0]
        return cls(family, size, eps, w if isinstance(w, torch.nn.Parameter) else None,
                   b if isinstance(b, torch.nn.Parameter) else None, weight_attr, bias_attr, **kw)

    # -- state -----------------------------------------------------------------------------------
    def _sync_flags(self) -> None:
        f = self.flags.tolist()
        self.fake_main, self.fake_v, self.frozen = bool(f[0]), bool(f[1]), bool(f[2])

    def set_fake(self, main: bool, v: bool) -> None:
        """Set which paths are fake; freezes ``sigma`` from the moving average on the first removal."""
        if (main or v) and not self.frozen:
            with torch.no_grad():
                self.sigma.fill_(float(self.sigma_ema))
                if self.mode == "dyt" and self.dyt_alpha0 is None:
                    self.alpha.fill_(1.0 / float(self.sigma_ema))
            self.flags[2] = 1
        self.flags[0], self.flags[1] = int(main), int(v)
        self._sync_flags()

    @property
    def gain(self) -> torch.Tensor | None:
        return getattr(self, self.weight_attr, None)

    @property
    def shift(self) -> torch.Tensor | None:
        return getattr(self, self.bias_attr, None)

    def effective_gain(self) -> torch.Tensor | None:
        g = self.gain
        if g is None:
            return None
        return g + self.offset if self.offset else g

    # -- calibration ------------------------------------------------------------------------------
    def start_calibration(self) -> None:
        self._calib = []

    def finish_calibration(self) -> float:
        """Set ``sigma_ema`` to the mean per-token scale seen since ``start_calibration`` (all ranks)."""
        if not self._calib:
            raise RuntimeError("no calibration data reached this norm")
        stats = torch.stack(self._calib).sum(0)  # [2]: sum of sigma, count
        stats = _all_reduce_mean(stats)
        self.sigma_ema.fill_(float(stats[0] / stats[1]))
        self._calib = None
        return float(self.sigma_ema)

    # -- forward ----------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The real norm without its gain and shift: [..., d] -> [..., d] (in x's dtype)."""
        dtype = x.dtype
        xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        if self.family == "layernorm":
            y = torch.nn.functional.layer_norm(xf, (self.size,), None, None, self.eps)
        else:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., d]
        return y.to(dtype)

    def _real(self, x: torch.Tensor) -> torch.Tensor:
        return self._affine(self.normalize(x))

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        g, b = self.effective_gain(), self.shift
        if g is not None:
            y = y * g
        if b is not None:
            y = y + b
        return y

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dyt":
            return self._affine(torch.tanh(self.alpha * x))  # DyT: no centring
        if self.family == "layernorm":
            x = x - x.mean(-1, keepdim=True)  # [..., d]
        return self._affine(x / self.sigma.to(x.dtype))

    @torch.no_grad()
    def _track(self, x: torch.Tensor) -> None:
        s = per_token_sigma(x.detach(), self.family, self.eps)  # [...]
        if self._calib is not None:
            self._calib.append(torch.stack([s.sum().double(), torch.tensor(float(s.numel()), dtype=torch.float64)]))
            return
        if self.training and not self.frozen:
            batch = _all_reduce_mean(s.mean().double())
            self.sigma_ema.mul_(self.momentum).add_((1.0 - self.momentum) * batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.v_output = None
        main_fake = self.fake_main
        v_fake = self.fake_v if self.split_v else main_fake
        if not (main_fake and v_fake) or self._calib is not None:
            self._track(x)
        if main_fake and v_fake:
            return self._fake(x)
        real = self._real(x)
        if not main_fake and not v_fake:
            return real
        fake = self._fake(x)
        if main_fake:
            self.v_output = real
            return fake
        self.v_output = fake
        return real

    def extra_repr(self) -> str:
        state = "fake" if self.fake_main and (self.fake_v or not self.split_v) else \
            "real" if not self.fake_main and not self.fake_v else f"qk={'fake' if self.fake_main else 'real'}, v={'fake' if self.fake_v else 'real'}"
        return f"{self.family}, {self.size}, eps={self.eps}, mode={self.mode}, {state}, sigma={float(self.sigma):.4g}"
