"""Recipes: declarative, validated YAML files that say which transform to run and how.

Unknown keys are errors; step names must be registered handlers (``normsurgeon.transforms.apply.STEPS``).
Built-in recipes live in the repository's ``recipes/`` folder and are named by file stem.

>>> r = load_recipe("preln-to-rmsnorm")
>>> r.target, r.steps[0]
('rmsnorm', 'untie_tied_readers')
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

# the reader shared by every recipe kind; re-exported, as this module's names
from normsurgeon.io.recipe_files import BUILTIN_DIR, builtin_recipes, read_recipe_file, validate_recipe

__all__ = ["BUILTIN_DIR", "Recipe", "VerifySettings", "builtin_recipes", "load_recipe", "read_recipe_file",
           "recipe_for_target", "validate_recipe"]


class VerifySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_sequences: int = 4
    seq_len: int = 64
    seed: int = 0


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normsurgeon: Literal[1]
    name: str
    description: str = ""
    target: Literal["rmsnorm", "crmsnorm"]
    bias_policy: Literal["stock", "fold-all"] = "stock"
    compute_dtype: Literal["float64"] = "float64"
    steps: list[str]
    verify: VerifySettings = VerifySettings()

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, steps: list[str]) -> list[str]:
        from normsurgeon.transforms.apply import STEPS

        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; known: {sorted(STEPS)}")
        return steps


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a built-in recipe by name, or a recipe file by path; invalid recipes raise UsageError."""
    path, data = read_recipe_file(name_or_path)
    if isinstance(data, dict) and data.get("target") == "remove-ln":  # fine-tuning recipes (normsurgeon.lnfree)
        from normsurgeon.lnfree.recipe import load_lnfree_recipe

        return load_lnfree_recipe(path)
    return validate_recipe(Recipe, data, path)


def recipe_for_target(target: str) -> Recipe:
    return load_recipe({"rmsnorm": "preln-to-rmsnorm", "crmsnorm": "preln-to-crmsnorm"}[target])
