"""What the shared loop trains on: a task gives each step's batch, splits it into micro-batches, computes
a micro-batch's loss, and evaluates the model. The loop (``loop.train``) owns everything else.

- ``TokenTask``: next-token prediction on token windows (``TokenData``); the loss comes from the hooks
  (``TrainHooks.loss``), so recipes add auxiliary terms.
- ``prepbn.data.ImageTask`` (in its own package): image classification with cross-entropy.

>>> from normsurgeon.train.data import TokenData
>>> import torch
>>> task = TokenTask(TokenData(torch.arange(600) % 7, torch.arange(300) % 7, "toy"))
>>> task.units_per_step(type("C", (), {"batch_size": 2, "block_size": 8})())
16
"""
from __future__ import annotations

from typing import Any

import torch

from normsurgeon.train.data import TokenData, check_lengths, heldout_windows, train_batch
from normsurgeon.train.evaluate import heldout_loss


class TrainTask:
    """Override all methods; see ``TokenTask``."""

    def check(self, cfg) -> None:
        """Refuse settings the data cannot serve (before any training)."""

    def batch(self, step: int, cfg, rank: int, world: int, device, dtype: torch.dtype) -> Any:
        """This process's share of step ``step``'s batch: a pure function of (seed, step, rank)."""
        raise NotImplementedError

    def split(self, batch: Any, micro: int) -> list[Any]:
        raise NotImplementedError

    def rows(self, micro_batch: Any) -> int:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, hooks, micro_batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, plain task loss) for one micro-batch."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, cfg) -> dict[str, float]:
        raise NotImplementedError

    def units_per_step(self, cfg) -> int:
        """Tokens (or samples) per optimizer step, for the throughput figure."""
        raise NotImplementedError


class TokenTask(TrainTask):
    def __init__(self, data: TokenData):
        self.data = data
        self._eval: torch.Tensor | None = None

    def check(self, cfg) -> None:
        check_lengths(self.data, cfg.block_size)

    def batch(self, step, cfg, rank, world, device, dtype):
        ids = train_batch(self.data, step, cfg.batch_size, cfg.block_size, cfg.seed)[rank::world]  # [rows, T]
        return ids.to(device)

    def split(self, batch, micro):
        return list(batch.split(micro))

    def rows(self, micro_batch) -> int:
        return micro_batch.shape[0]

    def loss(self, model, hooks, micro_batch):
        return hooks.loss(model, micro_batch)

    def evaluate(self, model, cfg):
        if self._eval is None:
            self._eval = heldout_windows(self.data.heldout, cfg.eval_windows, cfg.block_size, cfg.eval_seed)
        return {"heldout_loss": heldout_loss(model, self._eval)}

    def units_per_step(self, cfg) -> int:
        return cfg.batch_size * cfg.block_size
