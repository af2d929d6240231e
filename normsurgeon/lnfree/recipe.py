"""The ``remove-ln`` recipe: schedule, training settings and losses, validated strictly.

Built-in recipes live in ``recipes/`` next to the conversion recipes, with ``target: remove-ln``.

>>> r = load_lnfree_recipe("remove-ln-tiny")
>>> r.target, r.train.steps, [s.role for s in r.schedule.stages]
('remove-ln', 150, ['mlp', 'attn_qk', 'attn_v', 'final'])
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from normsurgeon.errors import UsageError
from normsurgeon.io.recipe_files import read_recipe_file, validate_recipe
from normsurgeon.lnfree.schedule import Schedule
from normsurgeon.train.config import TrainConfig


class Losses(BaseModel):
    """Auxiliary losses added to the next-token cross-entropy."""

    model_config = ConfigDict(extra="forbid")
    kl_weight: float = Field(0.0, ge=0.0)  # KL(original || current) per token, original model frozen
    uniform_scale_weight: float = Field(0.0, ge=0.0)  # B25: variance of per-token scale before the final norm


class RemoveLnRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normsurgeon: Literal[1]
    name: str
    description: str = ""
    target: Literal["remove-ln"]
    schedule: Schedule
    train: TrainConfig
    losses: Losses = Losses()
    calibration_batches: int = Field(8, ge=1)
    dyt_alpha0: float = 0.5  # DyT initial alpha (paper default); see docs/ln_removal.md


def load_lnfree_recipe(name_or_path: str | Path) -> RemoveLnRecipe:
    """A built-in remove-ln recipe by name (``recipes/<name>.yaml``) or a file; invalid -> UsageError."""
    path, data = read_recipe_file(name_or_path)
    if not isinstance(data, dict) or data.get("target") != "remove-ln":
        raise UsageError(f"recipe {path.name} is not a remove-ln recipe (target: {data.get('target') if isinstance(data, dict) else '?'})")
    return validate_recipe(RemoveLnRecipe, data, path)
