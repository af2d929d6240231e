"""Calibration statistics of the *source* model, gathered with hooks in one no-grad pass.

- ``sublayer_rms[(i, j)]``: mean token RMS of sublayer j's output in block i (j = 0 attention, 1 MLP);
  an added output norm gets this as its gain (Peri-LN calibration; +0.03 nats vs +0.53 at gain 1 in
  the research pilot).
- ``norm_input_rms[name]``: mean token RMS of each norm's input; DyT starts at alpha = 1/RMS so that
  tanh(alpha x) ~ x / RMS(x) for typical tokens.
- ``head_rms[(i, 'q'|'k'|'v')]``: mean per-head RMS of the projection outputs (QK-norm gains).
"""
from __future__ import annotations

import dataclasses

import torch

from normsurgeon.placement.family import Family, head_dim


@dataclasses.dataclass
class Calibration:
    sublayer_rms: dict[tuple[int, int], float]
    norm_input_rms: dict[str, float]
    head_rms: dict[tuple[int, str], float]
    tokens: int


def _token_rms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).pow(2).mean(-1).sqrt()  # [...]


@torch.no_grad()
def calibrate(model: torch.nn.Module, fam: Family, ids: torch.Tensor, micro_batch: int = 4) -> Calibration:
    """Run the source model on ``ids`` [n, T] and average the statistics above over all tokens."""
    sums: dict = {}

    def add(key, rms: torch.Tensor) -> None:
        s, c = sums.get(key, (0.0, 0))
        sums[key] = (s + float(rms.sum()), c + rms.numel())

    handles = []
    blocks = fam.blocks(model)
    hd = head_dim(model, fam)
    for i, blk in enumerate(blocks):
        for j, name in enumerate((fam.attn, fam.mlp)):
            handles.append(getattr(blk, name).register_forward_hook(
                lambda m, a, out, key=("sub", i, j): add(key, _token_rms(out[0] if isinstance(out, tuple) else out))))
        for j, name in enumerate(fam.in_norms):
            handles.append(getattr(blk, name).register_forward_pre_hook(
                lambda m, a, key=("norm", f"{fam.layers}.{i}.{name}"): add(key, _token_rms(a[0]))))
        attn = getattr(blk, fam.attn)
        for n in ("q", "k", "v"):
            proj = getattr(fam, n)
            if proj is not None:
                handles.append(getattr(attn, proj).register_forward_hook(
                    lambda m, a, out, key=("head", i, n): add(key, _token_rms(out.view(*out.shape[:-1], -1, hd)))))
    handles.append(model.get_submodule(fam.final_norm).register_forward_pre_hook(
        lambda m, a: add(("norm", fam.final_norm), _token_rms(a[0]))))
    try:
        for start in range(0, ids.shape[0], micro_batch):
            model(input_ids=ids[start:start + micro_batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    mean = {k: s / c for k, (s, c) in sums.items()}
    return Calibration({(k[1], k[2]): v for k, v in mean.items() if k[0] == "sub"},
                       {k[1]: v for k, v in mean.items() if k[0] == "norm"},
                       {(k[1], k[2]): v for k, v in mean.items() if k[0] == "head"}, int(ids.numel()))
