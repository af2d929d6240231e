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

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from normsurgeon.errors import UsageError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "recipes"


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


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def read_recipe_file(name_or_path: str | Path) -> tuple[Path, object]:
    """Find a recipe (a file path, or a built-in name) and parse its YAML; problems raise UsageError."""
    path = Path(name_or_path)
    if not path.is_file():
        builtin = builtin_recipes().get(str(name_or_path))
        if builtin is None:
            raise UsageError(f"no recipe {name_or_path!r} (built-in: {', '.join(builtin_recipes())})")
        path = builtin
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"recipe {path} is not a text file (not UTF-8): a recipe is YAML") from None
    except OSError as e:
        raise UsageError(f"cannot read recipe {path}: {e.strerror or e}") from None
    try:
        return path, yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"recipe {path} is not valid YAML: {e}".splitlines()[0]) from None


def validate_recipe(model_cls: type[BaseModel], data: object, path: Path):
    """``model_cls.model_validate(data)`` with the first problem as a one-line UsageError."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"recipe {path.name}: {where}: {first['msg']}") from None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a built-in recipe by name, or a recipe file by path; invalid recipes raise UsageError."""
    path, data = read_recipe_file(name_or_path)
    if isinstance(data, dict) and data.get("target") == "remove-ln":  # fine-tuning recipes (normsurgeon.lnfree)
        from normsurgeon.lnfree.recipe import load_lnfree_recipe

        return load_lnfree_recipe(path)
    return validate_recipe(Recipe, data, path)


def recipe_for_target(target: str) -> Recipe:
    return load_recipe({"rmsnorm": "preln-to-rmsnorm", "crmsnorm": "preln-to-crmsnorm"}[target])
