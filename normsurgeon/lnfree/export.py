"""Export a model whose norms are all fake: the stock form (eps trick) and the native form (folded).

Stock form (Baroni et al. 2025): each norm keeps its module, with ``eps = 1e12`` and gain
``g * 1e6 / sigma``: ``(x - mean) / sqrt(var + 1e12) * g * 1e6 / sigma ~= (x - mean) * g / sigma``
(relative error ``var / 2e12``). The stock class loads it with no remote code. The scaled gains reach
``1e6 / sigma``: float16 (max 65504) overflows; bfloat16 and float32 are fine. Needs a config key
that sets the epsilon of exactly the removed norms (GPT-2 ``layer_norm_epsilon``, NeoX
``layer_norm_eps``, Llama ``rms_norm_eps``); OPT hard-codes its LayerNorm epsilon, so it has no stock form.

Native form: a fixed-scale norm is linear per token, ``y = M x + c`` with
``M = diag(g) (I - 11^T/d) / sigma`` (LayerNorm; centring included) or ``diag(g) / sigma`` (RMSNorm),
``c = b``. Every reader ``W`` becomes ``W M`` with bias ``W c + b``; tied readers (an output embedding
tied to the input table) are untied; a reader without a bias slot gets one when ``W c != 0``. The norms
become ``Identity``. The residual stream is unchanged, so every activation equals the fake-norm
model's. DyT norms are not linear: the native form keeps them as ``DyT`` modules. An embedding norm
(baked into its table at install, scale 1) is applied to the table rows once more and becomes
``Identity``. A norm read by something other than linear layers (an MoE router module, fused expert
weights) cannot be folded: that model has no native form (``NativeFormUnavailable``), only the stock one.

>>> import torch
>>> from normsurgeon.lnfree.fake_norm import FixedScaleNorm
>>> ln = torch.nn.LayerNorm(4).double()
>>> n = FixedScaleNorm.from_module(ln, "layernorm", 1e-5); _ = n.sigma_ema.fill_(3.0); n.set_fake(True, True)
>>> m, c = fixed_map(n); x = torch.randn(2, 4, dtype=torch.float64)
>>> torch.allclose(n(x), x @ m.T + c)
True
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from normsurgeon.lnfree.dyt import DyT
from normsurgeon.lnfree.fake_norm import FixedScaleNorm
from normsurgeon.lnfree.sites import Site, _shared
from normsurgeon.transforms.apply import mark_untied
from normsurgeon.module_tree import set_module

EPS_KEYS = ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "norm_eps", "layernorm_epsilon", "norm_epsilon")
BIG_EPS = 1e12
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")


class StockFormUnavailable(Exception):
    """Why the eps-trick form cannot be written for this model."""


class NativeFormUnavailable(Exception):
    """Why the folded form cannot be written for this model."""


def fixed_map(norm: FixedScaleNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(M [d, d], c [d]) with ``norm(x) = M x + c`` for a fake fixed-scale norm (in the norm's dtype)."""
    d = norm.size
    p = next(iter(norm.parameters()), norm.sigma)
    dtype, dev = p.dtype, p.device
    g = norm.effective_gain()
    g = g.detach() if g is not None else torch.ones(d, dtype=dtype, device=dev)
    c = norm.shift.detach() if norm.shift is not None else torch.zeros(d, dtype=dtype, device=dev)
    m = torch.eye(d, dtype=dtype, device=dev)  # [d, d]
    if norm.family == "layernorm":
        m = m - 1.0 / d  # centring C = I - 11^T/d
    m = g[:, None] * m / norm.sigma.to(dtype)  # diag(g) C / sigma
    return m, c.clone()


@dataclasses.dataclass
class NativeInfo:
    identity: list[str]
    created_bias: list[str]
    untied: list[str]
    dyt: dict[str, dict]


def fold_native(model: torch.nn.Module, sites: list[Site]) -> NativeInfo:
    """In place: fold every fake fixed-scale norm into its readers (norm -> Identity); DyT -> ``DyT``.

    Do this in float64 and cast once. Every norm must be fully fake. Raises NativeFormUnavailable
    (before changing anything) when a fixed-scale norm cannot be folded.
    """
    why = native_blocker(model, sites)
    if why:
        raise NativeFormUnavailable(why)
    info = NativeInfo([], [], [], {})
    for s in sites:
        norm = model.get_submodule(s.name)
        if not isinstance(norm, FixedScaleNorm) or not norm.fake_main or (s.split and not norm.fake_v):
            raise ValueError(f"`{s.name}` is not fully removed")
        if norm.mode == "dyt":
            _to_dyt(model, s.name, norm, info)
            continue
        if s.role == "embedding":  # rows -> norm(rows): (row - mean) * g + b, scale 1
            table = model.get_submodule(s.readers[0][0])
            with torch.no_grad():
                table.weight = torch.nn.Parameter(norm(table.weight.detach()).contiguous())
            set_module(model, s.name, torch.nn.Identity())
            info.identity.append(s.name)
            continue
        m, c = fixed_map(norm)
        for r, layout in s.readers:
            mod = model.get_submodule(r)
            if layout not in ("linear", "conv1d"):
                raise NativeFormUnavailable(f"`{r}` reads `{s.name}` but is not a linear layer")
            w = mod.weight.detach()
            if layout == "linear":  # [out, in]
                new_w, extra = w @ m, w @ c  # W M, W c
            else:  # conv1d [in, out]: out = y W
                new_w, extra = m.T @ w, c @ w
            if _shared(model, mod.weight, r):
                info.untied.append(r)
            mod.weight = torch.nn.Parameter(new_w.contiguous())
            bias = getattr(mod, "bias", None)
            if isinstance(bias, torch.Tensor):
                mod.bias = torch.nn.Parameter(bias.detach() + extra)
            elif bool(torch.any(extra != 0)):
                mod.bias = torch.nn.Parameter(extra)
                info.created_bias.append(r)
        set_module(model, s.name, torch.nn.Identity())
        info.identity.append(s.name)
    if info.untied:
        mark_untied(model)
    return info


def native_blocker(model: torch.nn.Module, sites: list[Site]) -> str | None:
    """Why the fixed-scale norms cannot all be folded into their readers (None: they can)."""
    for s in sites:
        norm = model.get_submodule(s.name)
        if s.role == "embedding" or getattr(norm, "mode", "fixed") == "dyt":
            continue
        if s.unfoldable:
            return f"`{s.name}` cannot be folded into its readers: {s.unfoldable[0]}"
        bad = [r for r, layout in s.readers if layout not in ("linear", "conv1d")]
        if bad:
            return f"`{bad[0]}` reads `{s.name}` but is not a linear layer"
    return None


def stock_blocker(model: torch.nn.Module, sites: list[Site]) -> str | None:
    """Why the eps-trick form cannot be written (None: it can); checks the config and the norms only."""
    try:
        stock_config(model, sites)
        for s in sites:
            norm = model.get_submodule(s.name)
            if getattr(norm, "mode", "fixed") != "fixed":
                raise StockFormUnavailable("DyT norms compute tanh, which no stock norm module can express")
            if getattr(norm, "gain", None) is None:
                raise StockFormUnavailable(f"`{s.name}` has no gain to carry the 1e6/sigma scale")
    except StockFormUnavailable as e:
        return str(e)
    return None


def _to_dyt(model: torch.nn.Module, name: str, norm: FixedScaleNorm, info: NativeInfo) -> None:
    w, b = norm.effective_gain(), norm.shift
    new = DyT(norm.size, weight=w is not None, bias=b is not None,
              weight_attr=norm.weight_attr, bias_attr=norm.bias_attr).to(norm.alpha.dtype)
    with torch.no_grad():
        new.alpha.copy_(norm.alpha)
        if w is not None:
            getattr(new, norm.weight_attr).copy_(w)
        if b is not None:
            getattr(new, norm.bias_attr).copy_(b)
    set_module(model, name, new)
    info.dyt[name] = {"size": norm.size, "weight_attr": norm.weight_attr if w is not None else None,
                      "bias_attr": norm.bias_attr if b is not None else None}


def _eps_of(module: torch.nn.Module) -> float | None:
    for attr in _EPS_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def stock_config(model: torch.nn.Module, sites: list[Site]):
    """A copy of ``model.config`` whose epsilon keys give exactly the removed norms ``eps = 1e12``.

    Raises StockFormUnavailable (with the reason) when no config key does that.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise StockFormUnavailable("the model has no Hugging Face config")
    new = copy.deepcopy(cfg)
    keys = [k for k in EPS_KEYS if isinstance(getattr(new, k, None), (int, float))]
    if not keys:
        raise StockFormUnavailable(f"{type(cfg).__name__} has no epsilon setting ({', '.join(EPS_KEYS[:3])}, ...)")
    for k in keys:
        setattr(new, k, BIG_EPS)
    names = {s.name for s in sites}
    with torch.device("meta"):
        probe = type(model)(new)
    for name, mod in probe.named_modules():
        eps = _eps_of(mod) if "norm" in type(mod).__name__.lower() or name in names else None
        if name in names and eps != BIG_EPS:
            raise StockFormUnavailable(f"the config's epsilon ({', '.join(keys)}) does not reach `{name}` "
                                       f"(its epsilon stays {eps})")
        if name not in names and eps == BIG_EPS:
            raise StockFormUnavailable(f"the config's epsilon ({', '.join(keys)}) is shared with `{name}`, "
                                       "which is not removed")
    return new


def stock_state(model: torch.nn.Module, sites: list[Site]) -> dict[str, torch.Tensor]:
    """The stock class's state dict: the fake model's tensors, norm gains times 1e6/sigma, no extra buffers."""
    state = {}
    extra = set()
    for s in sites:
        norm = model.get_submodule(s.name)
        if norm.mode != "fixed":
            raise StockFormUnavailable("DyT norms compute tanh, which no stock norm module can express")
        if norm.gain is None:
            raise StockFormUnavailable(f"`{s.name}` has no gain to carry the 1e6/sigma scale")
        extra |= {f"{s.name}.sigma", f"{s.name}.sigma_ema", f"{s.name}.flags"}
    for k, v in model.state_dict().items():
        if k not in extra:
            state[k] = v.detach().clone()
    root = BIG_EPS ** 0.5
    for s in sites:
        norm = model.get_submodule(s.name)
        g = norm.effective_gain().detach()
        scaled = g * (root / norm.sigma.to(g.dtype))  # [d]
        if norm.offset:
            scaled = scaled - norm.offset  # the stock module computes (offset + w)
        state[f"{s.name}.{norm.weight_attr}"] = scaled
    return state


def build_stock_model(model: torch.nn.Module, sites: list[Site], dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The stock class, with the eps trick, holding the fake model's function (eval mode)."""
    cfg = stock_config(model, sites)
    state = stock_state(model, sites)
    stock = type(model)(cfg)
    stock.to(dtype or next(iter(state.values())).dtype)
    missing, unexpected = stock.load_state_dict(state, strict=False)
    buffers = {n for n, _ in stock.named_buffers()}
    if [k for k in missing if k not in buffers] or unexpected:
        raise StockFormUnavailable(f"the stock class does not hold the same tensors ({len(missing)} missing, "
                                   f"{len(unexpected)} unexpected)")
    if getattr(cfg, "tie_word_embeddings", False):
        stock.tie_weights()
    return stock.eval()


def max_stock_gain(state: dict[str, torch.Tensor], sites: list[Site], weight_attrs: dict[str, str]) -> float:
    return max(float(state[f"{s.name}.{weight_attrs[s.name]}"].abs().max()) for s in sites)
