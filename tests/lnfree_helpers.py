"""Tiny fixtures shared by the remove-ln training tests (and the two-process script)."""
from __future__ import annotations

import torch
import transformers as T

from normsurgeon.lnfree.recipe import Losses
from normsurgeon.lnfree.schedule import Schedule, ScheduleRunner, Stage
from normsurgeon.lnfree.sites import install
from normsurgeon.lnfree.hooks import LnRemovalHooks
from normsurgeon.train.config import TrainConfig
from normsurgeon.train.data import TokenData

SCHEDULE = Schedule(momentum=0.9, stages=[Stage(role="mlp", start=1, gap=1), Stage(role="attn_qk", start=3, gap=1),
                                          Stage(role="attn_v", start=5, gap=1), Stage(role="final", start=6)])


def tiny_model(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = T.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=dropout,
                       embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg)


def tiny_data() -> TokenData:
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 64, (37,), generator=gen)
    stream = pattern.repeat(60)  # learnable, periodic
    return TokenData(stream[:1800], stream[1800:], {"source": "synthetic"})


def tiny_config(**kw) -> TrainConfig:
    base = dict(steps=8, lr=3e-3, warmup_steps=2, batch_size=4, block_size=16, checkpoint_every=4,
                eval_windows=4, spike_factor=50.0)
    base.update(kw)
    return TrainConfig(**base)


def removal_setup(seed: int = 0, dropout: float = 0.0):
    model = tiny_model(seed, dropout)
    sites = install(model)
    for s in sites.sites:
        sites.module(s.name).sigma_ema.fill_(1.0)
    hooks = LnRemovalHooks(ScheduleRunner(SCHEDULE, sites), sites, Losses())
    return model, sites, hooks
