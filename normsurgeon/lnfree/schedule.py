"""The removal schedule as data: which norm path goes fake at which optimizer step.

Order (Heimersheim 2024; Baroni et al. 2025): MLP-input norms block by block, then the attention
norms' q/k path, then their value path, then the final norm(s). Each stage has a ``start`` step and a
``gap`` (steps between consecutive blocks; 0 = all blocks at once). Stages may be listed in any order.
An event at step ``s`` takes effect before the forward pass of step ``s`` (steps count from 0).

Back-off: ``delay`` (added after a loss spike) postpones every event not yet applied.

>>> sch = Schedule(stages=[Stage(role="mlp", start=20, gap=2), Stage(role="final", start=104)])
>>> from normsurgeon.lnfree.sites import Site
>>> sites = [Site(f"h.{i}.ln_2", "mlp", i, "layernorm", []) for i in range(3)] + [Site("ln_f", "final", 3, "layernorm", [])]
>>> [(e.step, e.norm, e.path) for e in events(sch, sites)]
[(20, 'h.0.ln_2', 'main'), (22, 'h.1.ln_2', 'main'), (24, 'h.2.ln_2', 'main'), (104, 'ln_f', 'main')]
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from normsurgeon.lnfree.sites import Site, Sites

STAGE_ROLES = ("mlp", "attn_qk", "attn_v", "final")


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["mlp", "attn_qk", "attn_v", "final"]
    start: int = Field(ge=0)
    gap: int = Field(0, ge=0)


class Schedule(BaseModel):
    """Per-stage start and gap, and the moving-average momentum of the tracked scale."""

    model_config = ConfigDict(extra="forbid")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    stages: list[Stage]

    def last_step(self, sites: list[Site]) -> int:
        ev = events(self, sites)
        return max((e.step for e in ev), default=0)


@dataclasses.dataclass(frozen=True)
class Event:
    step: int
    norm: str
    path: str  # "main" (q/k and every non-value reader) | "v"
    stage: str


def events(schedule: Schedule, sites: list[Site]) -> list[Event]:
    """Every removal event, sorted by step (ties keep the canonical stage order)."""
    by_stage = {r: s for s in schedule.stages for r in [s.role]}
    missing = [r for r in STAGE_ROLES if r not in by_stage and _sites_for(r, sites)]
    if missing:
        raise ValueError(f"the schedule has no stage for {missing}")
    out: list[tuple[int, int, Event]] = []
    for order, role in enumerate(STAGE_ROLES):
        st = by_stage.get(role)
        group = _sites_for(role, sites)
        if st is None or not group:
            continue
        for i, site in enumerate(group):
            path = "v" if role == "attn_v" else "main"
            out.append((st.start + i * st.gap, order, Event(st.start + i * st.gap, site.name, path, role)))
    out.sort(key=lambda t: (t[0], t[1]))
    return [e for _, _, e in out]


def _sites_for(role: str, sites: list[Site]) -> list[Site]:
    if role == "mlp":
        return [s for s in sites if s.role == "mlp"]
    if role == "attn_qk":
        return [s for s in sites if s.role == "attn"]
    if role == "attn_v":
        return [s for s in sites if s.role == "attn" and s.split]
    return [s for s in sites if s.role == "final"]


class ScheduleRunner:
    """Applies events to installed norms as steps pass; its state (``delay``) is saved in checkpoints."""

    def __init__(self, schedule: Schedule, sites: Sites):
        self.schedule, self.sites = schedule, sites
        self.events = events(schedule, sites.sites)
        self.delay = 0

    def _applied(self, e: Event) -> bool:
        m = self.sites.module(e.norm)
        return m.fake_v if e.path == "v" else m.fake_main

    def _apply(self, e: Event) -> None:
        m = self.sites.module(e.norm)
        if e.path == "v":
            m.set_fake(m.fake_main, True)
        else:
            m.set_fake(True, m.fake_v)

    def on_step(self, step: int) -> list[Event]:
        done = []
        for e in self.events:
            if not self._applied(e) and e.step + self.delay <= step:
                self._apply(e)
                done.append(e)
        return done

    def finish(self) -> list[Event]:
        """Apply every remaining event (the run ended before the schedule did)."""
        return self.on_step(10**12)

    def stage(self, step: int) -> str:
        """A short label of the current stage for progress bars and plots."""
        pending = [e for e in self.events if not self._applied(e)]
        if not pending:
            return "norm-free"
        done = [e for e in self.events if self._applied(e)]
        return (done[-1].stage + "…") if done else "live"

    def state_dict(self) -> dict:
        return {"delay": self.delay}

    def load_state_dict(self, state: dict) -> None:
        self.delay = int(state.get("delay", 0))

    def back_off(self, steps: int) -> None:
        self.delay += steps
