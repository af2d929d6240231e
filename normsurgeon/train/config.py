"""Training settings shared by every fine-tuning recipe (``remove-ln``, later ``prepbn``).

>>> c = TrainConfig(steps=10, lr=1e-3)
>>> round(lr_at(c, 0), 6), round(lr_at(c, c.warmup_steps), 6)
(0.0001, 0.001)
"""
from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """One optimizer step sees ``batch_size`` windows of ``block_size`` tokens (over all processes)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(150, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float | None = None  # cosine floor; default lr / 10
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)  # on >=2-D parameters only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    batch_size: int = Field(16, ge=1)  # windows per optimizer step, all processes together
    micro_batch_size: int | None = None  # windows per forward pass on one process (None: all of them)
    block_size: int = Field(256, ge=2)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int | None = None
    eval_windows: int = Field(64, ge=1)
    eval_seed: int = 1234
    spike_factor: float = Field(1.5, gt=1.0)  # loss above factor x median of the recent window
    spike_window: int = Field(20, ge=3)
    max_backoffs: int = Field(3, ge=0)
    backoff_lr_factor: float = Field(0.5, gt=0, le=1)
    backoff_delay: int = Field(10, ge=0)  # steps added to the removal schedule per back-off

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        return self


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up from lr/10 to lr over ``warmup_steps``, then cosine to ``min_lr`` at ``steps``."""
    floor = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (0.1 + 0.9 * step / cfg.warmup_steps)
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * t))
