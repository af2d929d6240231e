"""Calibration statistics of the *source* model, gathered with hooks in one no-grad pass, on the modules
its anatomy names (``anatomy.py``).

- ``sublayer_rms[(i, j)]``: mean token RMS of sublayer j's output in block i (j = 0 attention, 1 MLP: the
  writer's output, what is added to the stream); an added output norm gets this as its gain (Peri-LN
  calibration; +0.03 nats vs +0.53 at gain 1 in the research pilot).
- ``norm_input_rms[name]``: mean token RMS of each stream norm's input (input, final and embedding
  norms); DyT starts at alpha = 1/RMS so that tanh(alpha x) ~ x / RMS(x) for typical tokens.
- ``head_rms[(i, 'q'|'k'|'v')]``: mean per-head RMS of the projection outputs (QK-norm gains), per head
  of a fused projection too.
"""
from __future__ import annotations

import dataclasses

import torch

from normsurgeon.placement.anatomy import Anatomy, first_tensor


@dataclasses.dataclass
class Calibration:
    sublayer_rms: dict[tuple[int, int], float]
    norm_input_rms: dict[str, float]
    head_rms: dict[tuple[int, str], float]
    tokens: int


def _token_rms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).pow(2).mean(-1).sqrt()  # [...]


def _heads(out: torch.Tensor, hd: int, layout: list[list[int]] | None) -> torch.Tensor:
    """[..., heads, hd] view of one role's heads in a projection's output."""
    if layout is None:
        return out.view(*out.shape[:-1], -1, hd)
    idx = torch.tensor(layout, dtype=torch.long, device=out.device)  # [heads, hd]
    return out[..., idx.reshape(-1)].view(*out.shape[:-1], *idx.shape)


@torch.no_grad()
def calibrate(model: torch.nn.Module, anatomy: Anatomy, ids: torch.Tensor, micro_batch: int = 4) -> Calibration:
    """Run the source model on ``ids`` [n, T] and average the statistics above over all tokens."""
    sums: dict = {}

    def add(key, rms: torch.Tensor) -> None:
        s, c = sums.get(key, (0.0, 0))
        sums[key] = (s + float(rms.sum()), c + rms.numel())

    handles = []
    norms = {n for b in anatomy.blocks for n in b.norms} | {anatomy.final_norm} | set(anatomy.embedding_norms)
    for name in sorted(norms):
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, key=("norm", name): add(key, _token_rms(a[0]))))
    for b in anatomy.blocks:
        for s in b.sublayers:
            handles.append(model.get_submodule(s.output).register_forward_hook(
                lambda m, a, out, key=("sub", b.index, s.index): add(key, _token_rms(first_tensor(out)))))
        at = b.attention
        if at is None or at.problem is not None:
            continue
        for role, proj in at.proj.items():
            if at.fused and at.channels is None:
                continue
            handles.append(model.get_submodule(proj).register_forward_hook(
                lambda m, a, out, key=("head", b.index, role), hd=at.head_dims[role], lay=at.layout(role):
                add(key, _token_rms(_heads(out, hd, lay)))))
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
