"""Reading recipe files: find one (a path, or a built-in name in the repository's ``recipes/`` folder),
parse its YAML and validate it against a recipe model, every problem a one-line ``UsageError``.

The one reader of every recipe kind: ``normsurgeon.recipes`` (conversion recipes, and the dispatch on
``target``) and ``normsurgeon.lnfree.recipe`` (``target: remove-ln``) both use it.

>>> sorted(builtin_recipes())[:2]
['preln-to-crmsnorm', 'preln-to-rmsnorm']
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from normsurgeon.errors import UsageError

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "recipes"


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
