"""Initial scales: the mean per-token scale of every live norm over a few training batches.

With several processes each takes its rows of each batch and the sums are all-reduced, so every rank
starts from the same value. A norm whose scale is already frozen (an embedding norm baked into its
table, scale 1) is left alone and reported with that scale.
"""
from __future__ import annotations

import torch

from normsurgeon.lnfree.sites import Sites
from normsurgeon.train.data import TokenData, train_batch


@torch.no_grad()
def calibrate(sites: Sites, data: TokenData, batches: int, batch_size: int, block_size: int, seed: int,
              rank: int = 0, world: int = 1, micro_batch_size: int | None = None) -> dict[str, float]:
    """Set every norm's ``sigma_ema`` from ``batches`` batches of training windows; return the values.

    Calibration batches are drawn with negative step numbers, so they never coincide with a training step.
    """
    model = sites.model
    was_training = model.training
    model.eval()
    live = [(s, sites.module(s.name)) for s in sites.sites if not sites.module(s.name).frozen]
    for _, m in live:
        m.start_calibration()
    device = next(model.parameters()).device
    try:
        for b in range(batches):
            ids = train_batch(data, -(b + 1), batch_size, block_size, seed)[rank::world]  # [rows, T]
            for chunk in ids.split(micro_batch_size or ids.shape[0]):
                model(input_ids=chunk.to(device))
    finally:
        values = {s.name: m.finish_calibration() for s, m in live}
        model.train(was_training)
    return {s.name: values.get(s.name, float(sites.module(s.name).sigma)) for s in sites.sites}
