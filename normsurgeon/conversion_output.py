"""What every Pre-RMSNorm / Pre-CRMSNorm output carries besides its weights, shared by the in-memory and the
streaming ``convert``: the output config.json with its ``normsurgeon`` section, the recipe, the dtype
option and the tool versions.

>>> from normsurgeon.recipes import recipe_for_target
>>> load_conversion_recipe(None, "crmsnorm").target
'crmsnorm'
"""
from __future__ import annotations

from pathlib import Path

import torch

from normsurgeon.version import __version__
from normsurgeon.errors import UsageError
from normsurgeon.io.formats import CUSTOM_PREFIX
from normsurgeon.recipes import Recipe, load_recipe, recipe_for_target
from normsurgeon.transforms.apply import structure_section
from normsurgeon.transforms.plan import RmsPlan
from normsurgeon.verification.metrics import dtype_name

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A dtype name (or "source" / None: the source's own) as a torch dtype.

    >>> parse_dtype("bfloat16"), parse_dtype("source")
    (torch.bfloat16, None)
    """
    if name is None or name == "source":
        return None
    if name not in _DTYPES:
        raise UsageError(f"unknown dtype {name!r} (choose from source, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def conversion_section(config: dict, class_name: str, plan: RmsPlan, recipe: Recipe,
                       steps: list[str] | None = None) -> dict:
    """The ``normsurgeon`` section of the output's config.json: what the loader rebuilds."""
    cfg = config
    return {
        "format": f"pre-{plan.target}",
        "version": 1,
        "normsurgeon_version": __version__,
        "recipe": recipe.name,
        "source_model_type": cfg.get("model_type"),
        "source_architecture": class_name,
        "stock_loadable": plan.stock_loadable,
        **structure_section(plan, steps),
    }


def config_json(config: dict, class_name: str, from_factory: bool, plan: RmsPlan, recipe: Recipe,
                dtype: torch.dtype, steps: list[str] | None = None) -> dict:
    """The output's config.json: the source's, with its dtype, the untying and the normsurgeon section
    (and a ``normsurgeon_`` model type when stock transformers cannot hold the result)."""
    cfg = dict(config)
    cfg["dtype"] = dtype_name(dtype)
    cfg.pop("torch_dtype", None)
    if plan.untie:
        cfg["tie_word_embeddings"] = False
    section = conversion_section(config, class_name, plan, recipe, steps)
    cfg["normsurgeon"] = section
    if not section["stock_loadable"] and cfg.get("model_type"):
        # Stock transformers must refuse this folder loudly rather than load a different function.
        cfg["model_type"] = CUSTOM_PREFIX + cfg["model_type"]
    if from_factory and not cfg.get("architectures"):
        cfg["architectures"] = [class_name]
    return cfg



def load_conversion_recipe(recipe: str | Path | None, to: str) -> Recipe:
    """The recipe file or built-in name ``recipe`` if given, else the built-in recipe for ``to``."""
    rec = load_recipe(recipe) if recipe is not None else recipe_for_target(to)
    if not isinstance(rec, Recipe):
        raise UsageError(f"recipe {rec.name!r} is a {rec.target} recipe: run it with `normsurgeon {rec.target}`")
    return rec


def tool_versions() -> dict:
    """The versions of the tools that made an output (recorded in every report)."""
    import safetensors
    import transformers

    return {"normsurgeon": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def conversion_done_lines(plan: RmsPlan) -> list[str]:
    """What a conversion did, one Markdown line each, for the output's model card."""
    name = {"rmsnorm": "Pre-RMSNorm", "crmsnorm": "Pre-CRMSNorm"}[plan.target]
    lines = [f"Converted exactly to {name} (Jiang et al. 2023): folded {sum(f.fold_gain for f in plan.folds)} norm "
             f"gain(s) into the layers that read them, centred {len(plan.center)} residual writer(s), "
             "all in float64 and cast once."]
    if plan.untie:
        lines.append(f"Untied {', '.join(f'`{r}`' for r, _ in plan.untie)} from the embedding.")
    if plan.bake:
        lines.append(f"Baked {', '.join(f'`{n}`' for n, _ in plan.bake)} into the embedding table.")
    kept = [f.norm for f in plan.folds if not f.fold_gain]
    if kept:
        lines.append(f"{len(kept)} norm(s) keep their gain (e.g. `{kept[0]}`); see equivalence_report.md.")
    return lines


def write_conversion_card(folder: Path, source_ref: str, source_folder: Path | None, plan: RmsPlan, recipe: Recipe,
                          report: dict, out: Path) -> None:
    """The output's README.md (``io.model_card``): what was done, the equivalence result, how to load it."""
    from normsurgeon.io.model_card import write_model_card

    write_model_card(folder, source_ref, source_folder, recipe.name, report, plan.stock_loadable,
                     conversion_done_lines(plan), output_path=str(out))
