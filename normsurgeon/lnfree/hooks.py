"""The LN-removal method plugged into the generic training loop: schedule events, auxiliary losses.

Losses per micro-batch: next-token cross-entropy, plus optionally
- ``kl_weight * KL(original || current)`` per predicted token (the original model frozen, same input);
- ``uniform_scale_weight * mean((s_t - mean(s))^2)`` over the per-token scales ``s_t`` of the final
  norm's input (Baroni et al. 2025: pushes the residual norms toward uniform before the final norm goes).
"""
from __future__ import annotations

import torch

from normsurgeon.lnfree.fake_norm import per_token_sigma
from normsurgeon.lnfree.recipe import Losses
from normsurgeon.lnfree.schedule import ScheduleRunner
from normsurgeon.lnfree.sites import Sites
from normsurgeon.train.config import TrainConfig
from normsurgeon.train.loop import TrainHooks


class LnRemovalHooks(TrainHooks):
    def __init__(self, runner: ScheduleRunner, sites: Sites, losses: Losses, teacher: torch.nn.Module | None = None):
        self.runner, self.sites, self.losses, self.teacher = runner, sites, losses, teacher
        self._final_inputs: list[torch.Tensor] = []
        if losses.uniform_scale_weight > 0:
            for s in sites.by_role("final"):
                sites.handles.append(sites.module(s.name).register_forward_pre_hook(self._capture))

    def _capture(self, module, args):
        self._final_inputs.append(args[0])

    def on_step(self, step: int) -> list[str]:
        return [f"{e.norm}:{e.path}" for e in self.runner.on_step(step)]

    def stage(self, step: int) -> str:
        return self.runner.stage(step)

    def loss(self, model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._final_inputs.clear()
        logits = model(input_ids=ids).logits[:, :-1].float()  # [b, T-1, V]
        target = ids[:, 1:]  # [b, T-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        total = ce
        if self.losses.kl_weight > 0 and self.teacher is not None:
            with torch.no_grad():
                t_logp = self.teacher(input_ids=ids).logits[:, :-1].float().log_softmax(-1)  # [b, T-1, V]
            s_logp = logits.log_softmax(-1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            total = total + self.losses.kl_weight * kl
        if self.losses.uniform_scale_weight > 0 and self._final_inputs:
            for x in self._final_inputs:
                norm = self.sites.module(self.sites.by_role("final")[0].name)
                s = per_token_sigma(x, norm.family, norm.eps)  # [b, T]
                total = total + self.losses.uniform_scale_weight * (s - s.mean().detach()).pow(2).mean()
            self._final_inputs.clear()
        return total, ce

    def on_backoff(self, cfg: TrainConfig) -> None:
        self.runner.back_off(cfg.backoff_delay)

    def state_dict(self) -> dict:
        return {"schedule": self.runner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.runner.load_state_dict(state.get("schedule", {}))
