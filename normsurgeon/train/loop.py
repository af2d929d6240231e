"""The fine-tuning loop: accelerate (one or many processes), AdamW with warm-up + cosine, gradient
clipping, checkpoints and resume, stop on NaN, loss-spike back-off.

Determinism: the batch of step ``s`` and the random state it runs with (dropout) are pure functions of
(seed, s, rank), and every piece of state lives in
the checkpoint, so stopping after any checkpoint and resuming gives the same final weights as an
uninterrupted run with the same seed. With N processes each takes rows ``rank::N`` of the step's batch
and DDP averages gradients, which is the single-process step up to float summation order.

Method-specific behaviour comes in through ``TrainHooks`` (the LN-removal schedule, auxiliary losses).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch

from normsurgeon.errors import TrainingDiverged, UsageError  # noqa: F401 (TrainingDiverged re-exported)
from normsurgeon.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from normsurgeon.train.config import TrainConfig, lr_at
from normsurgeon.train.data import TokenData
from normsurgeon.train.evaluate import next_token_loss
from normsurgeon.train.spikes import SpikeDetector
from normsurgeon.train.tasks import TokenTask, TrainTask


class TrainHooks:
    """Override what a method needs; the defaults do nothing."""

    def on_step(self, step: int) -> list[str]:
        """Called before the forward pass of ``step``; returns descriptions of what changed."""
        return []

    def stage(self, step: int) -> str:
        return ""

    def extra_loss(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
        """An auxiliary loss for the micro-batch ``ids`` [b, T] (called after the main forward)."""
        return None

    def loss(self, model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss to minimise, plain cross-entropy) for one micro-batch."""
        ce = next_token_loss(model, ids)
        extra = self.extra_loss(model, ids)
        return (ce if extra is None else ce + extra), ce

    def on_backoff(self, cfg: TrainConfig) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclasses.dataclass
class TrainResult:
    steps_done: int
    history: list[dict[str, Any]]  # per step: step, loss, ce, lr, grad_norm, stage, events
    evals: list[dict[str, Any]]
    tokens_per_second: float
    peak_memory_mb: float
    backoffs: int
    stopped_at: int | None  # set when ``stop_after`` interrupted the run
    resumed_from: int | None
    checkpoint: str | None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def make_accelerator():
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Norm paths and DyT scales are unused in some stages, so DDP must allow unused parameters.
    # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs starts N processes
    # (torchrun); accelerate only joins them into one gloo group when told it runs on CPU.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def is_main_process() -> bool:
    """Whether this process is the main one of a (possibly multi-process) launch, known before the
    accelerator exists (torchrun and ``accelerate launch`` set ``RANK``): only it claims the output."""
    return int(os.environ.get("RANK", "0")) == 0


def train(model: torch.nn.Module, data: TokenData | TrainTask, cfg: TrainConfig, *, hooks: TrainHooks | None = None,
          checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = False,
          stop_after: int | None = None, log: Callable[[str], None] | None = None,
          accelerator=None, on_progress: Callable[..., None] | None = None) -> TrainResult:
    """Fine-tune ``model`` in place on ``data`` (token windows, or any ``TrainTask``) for ``cfg.steps`` steps.

    ``stop_after``: stop (after writing a checkpoint) once this many steps are done, as an interruption
    would; ``resume``: continue from the newest checkpoint in ``checkpoint_dir``. ``on_progress(step,
    steps, loss=, stage=)``: on the main process, at the start and after every step (``run_progress``).
    """
    hooks = hooks or TrainHooks()
    log = log or (lambda msg: None)
    acc = accelerator or make_accelerator()
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % world:
        raise UsageError(f"batch size {cfg.batch_size} is not divisible by the number of processes ({world})")
    task = data if isinstance(data, TrainTask) else TokenTask(data)
    task.check(cfg)
    rows = cfg.batch_size // world
    micro = cfg.micro_batch_size or rows

    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
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

    bar = ProgressBar(cfg.steps, step, enabled=progress and acc.is_main_process)
    on_progress = on_progress if acc.is_main_process else None
    if on_progress is not None:
        on_progress(step, cfg.steps, loss=None, stage=hooks.stage(step))
    step_time, timed_steps = 0.0, 0
    stopped_at = None
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
            torch.manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)  # dropout etc.: a function of the step
            batch = task.batch(step, cfg, rank, world, acc.device, dtype)
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=acc.device)
            ce_sum = torch.zeros((), device=acc.device)
            chunks = task.split(batch, micro)
            for i, mb in enumerate(chunks):
                share = task.rows(mb) / rows
                sync = contextlib.nullcontext() if i == len(chunks) - 1 else acc.no_sync(wrapped)
                with sync:
                    loss, ce = task.loss(wrapped, hooks, mb)
                    acc.backward(loss * share)
                total += loss.detach() * share
                ce_sum += ce.detach() * share
            step_loss = float(acc.reduce(total, "mean"))
            step_ce = float(acc.reduce(ce_sum, "mean"))
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
            step_time += time.perf_counter() - t0
            timed_steps += 1
            history.append({"step": step, "loss": step_loss, "ce": step_ce, "lr": lr, "grad_norm": gnorm,
                            "stage": hooks.stage(step), "events": events})
            step += 1
            bar.update(step, step_ce, hooks.stage(step - 1))
            if on_progress is not None:
                on_progress(step, cfg.steps, loss=step_ce, stage=hooks.stage(step - 1))
            if cfg.eval_every and step % cfg.eval_every == 0:
                evals.append({"step": step, **task.evaluate(inner, cfg)})
                wrapped.train()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
        if stopped_at is not None and (not history or step % cfg.checkpoint_every):
            checkpoint()
    finally:
        bar.close()
    tokens = task.units_per_step(cfg) * timed_steps
    return TrainResult(step, history, evals, tokens / step_time if step_time else 0.0,
                       peak_memory_mb(acc.device), backoffs, stopped_at, resumed_from, last_ckpt)


def run_progress(progress: Callable[..., None] | None, runs: dict[str, int]) -> dict[str, Callable | None]:
    """``train``'s ``on_progress`` for each of a job's runs (label -> steps): each run reports under its own
    label and, when there are several, all of them together under "whole job" (one ETA for the job).

    >>> seen = []
    >>> cb = run_progress(lambda *a, **k: seen.append(a), {"removal": 4, "control": 4})
    >>> cb["removal"](4, 4, loss=1.0); cb["control"](1, 4, loss=1.0); seen
    [('removal', 4, 4), ('whole job', 4, 8), ('control', 1, 4), ('whole job', 5, 8)]
    """
    if progress is None:
        return dict.fromkeys(runs)
    done, total = dict.fromkeys(runs, 0), sum(runs.values())

    def for_run(label: str) -> Callable[..., None]:
        def report(step: int, steps: int, **fields) -> None:
            done[label] = step
            progress(label, step, steps, unit="step", **fields)
            if len(runs) > 1:
                progress("whole job", sum(done.values()), total, unit="step")
        return report

    return {label: for_run(label) for label in runs}


class ProgressBar:
    """A rich progress bar with the loss and the current stage (stderr, main process only)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]fine-tune"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[stage]}"),
                                 TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.progress.add_task("ft", total=total, completed=start, loss="—", stage="")
        self.progress.start()

    def update(self, step: int, loss: float, stage: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", stage=stage)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
