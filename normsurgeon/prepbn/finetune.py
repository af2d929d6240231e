"""Fine-tuning with the progressive blend, on the shared training machinery (``normsurgeon.train``).

- Language models use the shared loop ``normsurgeon.train.loop.train`` unchanged, with ``BlendHooks``
  setting the blend weight before every step (its progress bar shows the loss and ``lam``).
- Image classifiers use ``train_classifier`` below: the same loop shape (accelerate, AdamW with the
  shared warm-up + cosine ``lr_at``, gradient clipping, ``TrainConfig``, the shared checkpoint files and
  resume, NaN stop, spike back-off) with a cross-entropy on labelled images instead of next-token
  windows. The shared loop samples token windows itself, so it cannot feed image batches.

The blend weight is a pure function of the step (plus the back-off delay kept in the hooks' state), so a
resumed run continues the schedule exactly.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

import torch

from normsurgeon.errors import UsageError
from normsurgeon.prepbn.data import ImageData, classifier_logits, evaluate, step_indices
from normsurgeon.prepbn.repbn import prepbn_modules
from normsurgeon.prepbn.schedule import BlendSchedule
from normsurgeon.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from normsurgeon.train.config import TrainConfig, lr_at
from normsurgeon.train.loop import TrainHooks, TrainingDiverged, TrainResult, _param_groups, make_accelerator
from normsurgeon.train.spikes import SpikeDetector


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


def train_classifier(model: torch.nn.Module, data: ImageData, cfg: TrainConfig, *, hooks: TrainHooks,
                     checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = False,
                     stop_after: int | None = None, log: Callable[[str], None] | None = None,
                     accelerator=None) -> TrainResult:
    """Fine-tune an image classifier in place for ``cfg.steps`` steps of ``cfg.batch_size`` images.

    ``TrainResult.tokens_per_second`` counts images per second here.
    """
    log = log or (lambda msg: None)
    acc = accelerator or make_accelerator()
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % world:
        raise UsageError(f"batch size {cfg.batch_size} is not divisible by the number of processes ({world})")
    rows = cfg.batch_size // world
    micro = cfg.micro_batch_size or rows
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    wrapped, opt = acc.prepare(model, opt)
    inner = acc.unwrap_model(wrapped)
    params = [p for p in inner.parameters() if p.requires_grad]
    dtype = next(inner.parameters()).dtype
    detector = SpikeDetector(cfg.spike_factor, cfg.spike_window)
    step, lr_scale, backoffs, history, evals = 0, 1.0, 0, [], []
    resumed_from, last_ckpt = None, None

    def snapshot() -> dict:
        return {"step": step, "model": {k: v.detach().clone().cpu() for k, v in inner.state_dict().items()},
                "optimizer": opt.state_dict(), "lr_scale": lr_scale, "backoffs": backoffs,
                "hooks": hooks.state_dict(), "detector": detector.state_dict(), "history": list(history),
                "evals": list(evals), "config": cfg.model_dump(mode="json")}

    def restore(state: dict) -> None:
        nonlocal step, lr_scale, backoffs, history, evals
        inner.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        hooks.load_state_dict(state["hooks"])
        detector.load_state_dict(state["detector"])
        step, lr_scale, backoffs = int(state["step"]), float(state["lr_scale"]), int(state["backoffs"])
        history, evals = list(state["history"]), list(state["evals"])

    if resume:
        path = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
        if path is None:
            raise UsageError(f"--resume: no checkpoint in {checkpoint_dir}")
        restore(load_checkpoint(path))
        resumed_from, last_ckpt = step, str(path)
        log(f"resumed from {path} (step {step})")
    memory = snapshot()

    def checkpoint() -> None:
        nonlocal memory, last_ckpt
        memory = snapshot()
        if checkpoint_dir is not None:
            if acc.is_main_process:
                last_ckpt = str(save_checkpoint(checkpoint_dir, step, memory, cfg.keep_checkpoints))
            acc.wait_for_everyone()

    from normsurgeon.train.loop import _Bar

    bar = _Bar(cfg.steps, step, enabled=progress and acc.is_main_process)
    busy, timed, stopped_at = 0.0, 0, None
    try:
        while step < cfg.steps:
            if stop_after is not None and step >= stop_after:
                stopped_at = step
                break
            events = hooks.on_step(step)
            lr = lr_at(cfg, step) * lr_scale
            for g in opt.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            torch.manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
            idx = step_indices(data, step, cfg.batch_size, cfg.seed)[rank::world]  # [rows]
            x = data.x_train[idx].to(acc.device, dtype)
            y = data.y_train[idx].to(acc.device)
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=acc.device)
            chunks = list(zip(x.split(micro), y.split(micro)))
            for i, (xb, yb) in enumerate(chunks):
                sync = contextlib.nullcontext() if i == len(chunks) - 1 else acc.no_sync(wrapped)
                with sync:
                    loss = torch.nn.functional.cross_entropy(classifier_logits(wrapped, xb).float(), yb)
                    acc.backward(loss * (len(yb) / rows))
                total += loss.detach() * (len(yb) / rows)
            step_loss = float(acc.reduce(total, "mean"))
            if cfg.grad_clip:
                gnorm = float(acc.clip_grad_norm_(params, cfg.grad_clip))
            else:
                gnorm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            if not (math.isfinite(step_loss) and math.isfinite(gnorm)):
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else " (no checkpoint was written yet)"
                raise TrainingDiverged(f"the loss became {step_loss} (gradient norm {gnorm}) at step {step}{where}")
            if detector.is_spike(step_loss) and backoffs < cfg.max_backoffs:
                at = step
                restore(memory)
                backoffs += 1
                lr_scale *= cfg.backoff_lr_factor
                hooks.on_backoff(cfg)
                memory = snapshot()
                log(f"loss spike at step {at} ({step_loss:.3f}): back to step {step}, lr x{lr_scale:g}, "
                    f"schedule delayed by {cfg.backoff_delay} steps (back-off {backoffs}/{cfg.max_backoffs})")
                continue
            opt.step()
            busy += time.perf_counter() - t0
            timed += 1
            history.append({"step": step, "loss": step_loss, "ce": step_loss, "lr": lr, "grad_norm": gnorm,
                            "stage": hooks.stage(step), "events": events})
            step += 1
            bar.update(step, step_loss, hooks.stage(step - 1))
            if cfg.eval_every and step % cfg.eval_every == 0:
                evals.append({"step": step, **evaluate(inner, data.x_test, data.y_test)})
                wrapped.train()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
        if stopped_at is not None and (not history or step % cfg.checkpoint_every):
            checkpoint()
    finally:
        bar.close()
    from normsurgeon.train.loop import _peak_memory_mb

    return TrainResult(step, history, evals, cfg.batch_size * timed / busy if busy else 0.0,
                       _peak_memory_mb(acc.device), backoffs, stopped_at, resumed_from, last_ckpt)
