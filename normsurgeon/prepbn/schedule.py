"""SLAB's progressive schedule, counted in optimizer steps.

The blend weight ``lam`` (weight of the original LayerNorm) is 1 for ``warmup`` steps, then decays
linearly from ``r0`` to 0 over ``steps`` (T) steps: ``lam(warmup + k) = r0 * (T - k) / T``, and stays 0
(pure RepBN) from step ``warmup + T`` on. SLAB counts training forward calls (``iter`` from T down);
counting optimizer steps makes the schedule independent of micro-batching and resumable.

>>> s = BlendSchedule(warmup=10, steps=20)
>>> [s.weight(i) for i in (0, 9, 10, 11, 20, 29, 30, 100)]
[1.0, 1.0, 1.0, 0.95, 0.5, 0.05, 0.0, 0.0]
"""
from __future__ import annotations

import dataclasses

from normsurgeon.errors import UsageError


@dataclasses.dataclass(frozen=True)
class BlendSchedule:
    warmup: int  # steps of pure LayerNorm
    steps: int  # T: steps of the linear decay
    r0: float = 1.0  # blend weight at the first decay step

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.steps < 1:
            raise UsageError(f"blend schedule needs warm-up >= 0 and decay steps >= 1 (got {self.warmup}, {self.steps})")
        if not 0.0 < self.r0 <= 1.0:
            raise UsageError(f"--r0 must be in (0, 1], not {self.r0}")

    @property
    def end(self) -> int:
        """The first step at which the blend weight is 0 (pure RepBN)."""
        return self.warmup + self.steps

    def weight(self, step: int) -> float:
        if step < self.warmup:
            return 1.0
        k = step - self.warmup
        if k >= self.steps:
            return 0.0
        return self.r0 * (self.steps - k) / self.steps

    def phase(self, step: int) -> str:
        return "LN warm-up" if step < self.warmup else "blend" if step < self.end else "RepBN"

    @classmethod
    def for_training(cls, total_steps: int, warmup: int | None = None, steps: int | None = None,
                     r0: float = 1.0) -> "BlendSchedule":
        """Defaults: 10 % warm-up, decay over the next 60 %, the last 30 % pure RepBN. The blend must end
        within training, so that the model that is folded is the one that was trained."""
        warmup = round(0.1 * total_steps) if warmup is None else warmup
        steps = max(1, round(0.6 * total_steps)) if steps is None else steps
        sched = cls(warmup, steps, r0)
        if sched.end > total_steps:
            raise UsageError(f"the blend ends at step {sched.end} (warm-up {warmup} + decay {steps}) but training "
                             f"has {total_steps} steps; the LayerNorm must be gone before the fold")
        return sched
