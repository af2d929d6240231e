"""Fine-tuning with the progressive blend, on the shared training machinery (``normsurgeon.train``).

- Language models use the shared loop ``normsurgeon.train.loop.train`` unchanged, with ``BlendHooks``
  setting the blend weight before every step (its progress bar shows the loss and ``lam``).
- Image classifiers use the same loop with ``ImageTask`` (labelled images, cross-entropy, accuracy);
  ``train_classifier`` is the shorthand.

The blend weight is a pure function of the step (plus the back-off delay kept in the hooks' state), so a
resumed run continues the schedule exactly.
"""
from __future__ import annotations

import torch

from normsurgeon.prepbn.data import ImageData, classifier_logits, evaluate, step_indices
from normsurgeon.prepbn.repbn import prepbn_modules
from normsurgeon.prepbn.schedule import BlendSchedule
from normsurgeon.train.config import TrainConfig
from normsurgeon.train.loop import TrainHooks, TrainResult, train
from normsurgeon.train.tasks import TrainTask


class BlendHooks(TrainHooks):
    """Set every PRepBN's blend weight from the schedule before each step; back-offs delay the schedule."""

    def __init__(self, model: torch.nn.Module, schedule: BlendSchedule):
        self.modules = list(prepbn_modules(model).values())
        self.schedule = schedule
        self.delay = 0
        self.current = 1.0

    def weight(self, step: int) -> float:
        return self.schedule.weight(step - self.delay)

    def on_step(self, step: int) -> list[str]:
        lam = self.weight(step)
        events = []
        if lam != self.current or step == 0:
            phase, before = self.schedule.phase(step - self.delay), self.schedule.phase(step - 1 - self.delay)
            if step > 0 and phase != before:
                events.append(f"{phase} from step {step}")
        for m in self.modules:
            m.set_blend(lam)
        self.current = lam
        return events

    def stage(self, step: int) -> str:
        return f"λ {self.weight(step):.3f}"

    def on_backoff(self, cfg: TrainConfig) -> None:
        self.delay += cfg.backoff_delay

    def state_dict(self) -> dict:
        return {"delay": self.delay}

    def load_state_dict(self, state: dict) -> None:
        self.delay = int(state.get("delay", 0))


class ImageTask(TrainTask):
    """Image classification for the shared loop: labelled images, cross-entropy, accuracy on the test split."""

    def __init__(self, data: ImageData):
        self.data = data

    def batch(self, step, cfg, rank, world, device, dtype):
        idx = step_indices(self.data, step, cfg.batch_size, cfg.seed)[rank::world]  # [rows]
        return self.data.x_train[idx].to(device, dtype), self.data.y_train[idx].to(device)

    def split(self, batch, micro):
        x, y = batch
        return list(zip(x.split(micro), y.split(micro)))

    def rows(self, micro_batch) -> int:
        return len(micro_batch[1])

    def loss(self, model, hooks, micro_batch):
        xb, yb = micro_batch
        loss = torch.nn.functional.cross_entropy(classifier_logits(model, xb).float(), yb)
        return loss, loss

    def evaluate(self, model, cfg):
        return evaluate(model, self.data.x_test, self.data.y_test)

    def units_per_step(self, cfg) -> int:
        return cfg.batch_size


def train_classifier(model: torch.nn.Module, data: ImageData, cfg: TrainConfig, *, hooks: TrainHooks,
                     **kwargs) -> TrainResult:
    """Fine-tune an image classifier in place with the shared loop (``TrainResult.tokens_per_second``
    counts images per second here)."""
    return train(model, ImageTask(data), cfg, hooks=hooks, **kwargs)
