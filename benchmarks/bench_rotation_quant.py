"""Fake (simulated) quantization and activation statistics for ``bench_rotation.py``; no third-party package.

- ``quantize_weights_(model, bits, group)``: round-to-nearest, symmetric, per output channel (``group=None``)
  or per group of ``group`` input features, on every linear layer (``nn.Linear``, GPT-2 ``Conv1D``) except
  the output head (kept in high precision, as QuaRot and SpinQuant do); embeddings are not quantized.
- ``act_quant(model, bits)``: a context that fake-quantizes the input of those layers per token
  (symmetric absmax over the feature axis), the "A8" of W4A8 / W8A8.
- ``stream_stats(model, windows, norms)``: per residual norm, kurtosis and max / median of |x| of its input
  (the residual stream) and of its output (what the readers read).

>>> import torch
>>> w = torch.tensor([[1.0, -0.5, 0.26, 0.0]])
>>> [round(v * 7, 4) for v in rtn(w, 4, axis=1)[0].tolist()]  # 7 levels each side: scale 1/7
[7.0, -3.0, 2.0, 0.0]
"""
from __future__ import annotations

import contextlib

import torch

from normsurgeon.graph.layouts import layout_of


def rtn(w: torch.Tensor, bits: int, axis: int, group: int | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest of ``w`` with one scale per slice along ``axis`` (the input axis, reduced
    over), or per ``group`` consecutive entries of it (a last, shorter group when ``group`` does not divide
    it: 352 = 5 x 64 + 32). Returns the dequantized tensor (same dtype)."""
    qmax = 2 ** (bits - 1) - 1
    x = w.movedim(axis, -1)  # [..., in]
    parts = x.split(group, -1) if group is not None else (x,)
    out = []
    for part in parts:  # [..., g]
        scale = part.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
        out.append((part / scale).round().clamp(-qmax, qmax) * scale)
    return torch.cat(out, -1).movedim(-1, axis)


def quantized_layers(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, torch.nn.Module]]:
    """The linear layers that are quantized: every Linear / Conv1D but the output head."""
    out = []
    for name, mod in model.named_modules():
        if layout_of(mod) in ("linear", "conv1d") and not any(name == s or name.endswith("." + s) for s in skip):
            out.append((name, mod))
    return out


def quantize_weights_(model: torch.nn.Module, bits: int, group: int | None = None) -> int:
    """Fake-quantize the weights of ``quantized_layers`` in place; returns how many layers."""
    layers = quantized_layers(model)
    with torch.no_grad():
        for _, mod in layers:
            in_axis = 1 if layout_of(mod) == "linear" else 0  # Linear [out, in]; Conv1D [in, out]
            mod.weight.copy_(rtn(mod.weight, bits, in_axis, group))
    return len(layers)


def per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric absmax fake quantization, one scale per token (last axis reduced)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return (x / scale).round().clamp(-qmax, qmax) * scale


@contextlib.contextmanager
def act_quant(model: torch.nn.Module, bits: int | None):
    """Fake-quantize the inputs of ``quantized_layers`` per token while inside (``bits=None``: nothing)."""
    hooks = []
    if bits is not None:
        for _, mod in quantized_layers(model):
            hooks.append(mod.register_forward_pre_hook(lambda m, a: (per_token(a[0], bits),) + tuple(a[1:])))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def kurtosis(x: torch.Tensor) -> float:
    """Kurtosis of all entries (3 for a Gaussian)."""
    x = x.double().flatten()
    c = x - x.mean()
    return float((c.pow(4).mean() / c.pow(2).mean().pow(2)).item())


def max_over_median(x: torch.Tensor) -> float:
    a = x.double().abs().flatten()
    return float((a.max() / a.median().clamp_min(1e-30)).item())


def channel_ratio(x: torch.Tensor) -> float:
    """Largest per-channel RMS over the median per-channel RMS (a channel outlier shows as a large ratio)."""
    rms = x.double().reshape(-1, x.shape[-1]).pow(2).mean(0).sqrt()
    return float((rms.max() / rms.median().clamp_min(1e-30)).item())


def stream_stats(model: torch.nn.Module, windows: torch.Tensor, norms: list[str]) -> list[dict]:
    """Per norm in ``norms``: statistics of its input (the residual stream) and output (the readers' input)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, (a[0].detach(), o.detach()))) for n in norms]
    try:
        with torch.no_grad():
            model(input_ids=windows)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n in norms:
        x, y = seen[n]
        rows.append({"norm": n, "stream_kurtosis": kurtosis(x), "stream_max_median": max_over_median(x),
                     "stream_channel_ratio": channel_ratio(x), "reader_kurtosis": kurtosis(y),
                     "reader_max_median": max_over_median(y), "reader_channel_ratio": channel_ratio(y)})
    return rows
