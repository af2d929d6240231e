"""``convert``: Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm, written as a Hugging Face folder with a report.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "rms"
>>> report = convert("normsurgeon.testing:tiny_gpt2", out, to="rmsnorm")
>>> report["status"], (out / "model.safetensors").is_file()
('pass', True)
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from normsurgeon import __version__
from normsurgeon.errors import UsageError, VerificationFailed
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.io.formats import CUSTOM_PREFIX
from normsurgeon.io.loader import LoadedModel, load_model
from normsurgeon.io.destination import Destination, claim_output
from normsurgeon.io.writer import copy_tagalong_files, parse_size, write_safetensors
from normsurgeon.recipes import Recipe, load_recipe, recipe_for_target
from normsurgeon.transforms.apply import apply_rms_plan
from normsurgeon.transforms.plan import RmsPlan, plan_rms_conversion
from normsurgeon.verification.api import verify_loaded
from normsurgeon.verification.metrics import dtype_name
from normsurgeon.verification.report import failure_line, write_report

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "source":
        return None
    if name not in _DTYPES:
        raise UsageError(f"unknown dtype {name!r} (choose from source, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def _section(src: LoadedModel, plan: RmsPlan, recipe: Recipe) -> dict:
    cfg = src.config
    return {
        "format": f"pre-{plan.target}",
        "version": 1,
        "normsurgeon_version": __version__,
        "recipe": recipe.name,
        "source_model_type": cfg.get("model_type"),
        "source_architecture": type(src.model).__name__,
        "stock_loadable": plan.stock_loadable,
        "rmsnorm": plan.replace,
        "gain_offset": plan.gain_offsets,
        "identity": [n for n, _ in plan.bake],
        "centred": plan.recentre,
        "created_bias": sorted(set(plan.created_bias)),
        "crms": {"full_size": plan.hidden_size} if plan.target == "crmsnorm" else None,
    }


def _config_json(src: LoadedModel, plan: RmsPlan, recipe: Recipe, dtype: torch.dtype) -> dict:
    cfg = dict(src.config)
    cfg["dtype"] = dtype_name(dtype)
    cfg.pop("torch_dtype", None)
    if plan.untie:
        cfg["tie_word_embeddings"] = False
    section = _section(src, plan, recipe)
    cfg["normsurgeon"] = section
    if not section["stock_loadable"] and cfg.get("model_type"):
        # Stock transformers must refuse this folder loudly rather than load a different function.
        cfg["model_type"] = CUSTOM_PREFIX + cfg["model_type"]
    if src.kind == "factory" and not cfg.get("architectures"):
        cfg["architectures"] = [type(src.model).__name__]
    return cfg


def _inventory(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict:
    changed = [k for k in after if k in before and (before[k].shape != after[k].shape or
                                                     not torch.equal(before[k].double(), after[k].double()))]
    return {"transformed": len(changed), "copied": sum(1 for k in after if k in before) - len(changed),
            "added": sorted(k for k in after if k not in before),
            "dropped": sorted(k for k in before if k not in after)}


def convert(model: str, out: str | Path, *, to: str = "rmsnorm", recipe: str | Path | None = None,
            dtype: str | None = None, bias_policy: str | None = None, overwrite: bool = False,
            run_verify: bool = True, text_file: Path | None = None, max_shard_size: str | int = "5GB",
            allow_pickle: bool = False, trust_remote_code: bool = False,
            status: Callable[[str], None] = lambda s: None) -> dict:
    """Convert ``model`` exactly and write it to ``out``; return the equivalence report.

    Raises UnsupportedModel (nothing written) when the structure does not allow an exact conversion,
    and VerificationFailed (nothing written) when the written checkpoint does not reproduce the source.
    """
    t0 = time.perf_counter()
    out = Path(out)
    rec = load_conversion_recipe(recipe, to)
    policy = bias_policy or rec.bias_policy
    max_bytes = parse_size(max_shard_size)
    out_dtype_req = parse_dtype(dtype)
    with claim_output(out, inputs=[model, text_file], overwrite=overwrite, status=status) as dest:
        return _convert(model, dest, rec, policy, max_bytes, out_dtype_req, run_verify, text_file, allow_pickle,
                        trust_remote_code, status, t0)


def load_conversion_recipe(recipe: str | Path | None, to: str) -> Recipe:
    """The recipe file or built-in name ``recipe`` if given, else the built-in recipe for ``to``."""
    rec = load_recipe(recipe) if recipe is not None else recipe_for_target(to)
    if not isinstance(rec, Recipe):
        raise UsageError(f"recipe {rec.name!r} is a {rec.target} recipe: run it with `normsurgeon {rec.target}`")
    return rec


def _convert(model: str, dest: Destination, rec: Recipe, policy: str, max_bytes: int,
             out_dtype_req: torch.dtype | None, run_verify: bool, text_file: Path | None, allow_pickle: bool,
             trust_remote_code: bool, status: Callable[[str], None], t0: float) -> dict:
    out = dest.path
    status("loading the source model")
    src = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    out_dtype = out_dtype_req or src.dtype
    before = {k: v.detach().clone() for k, v in src.model.state_dict().items()}

    status("mapping norms from the dataflow")
    work = copy.deepcopy(src.model).to(torch.float64)
    norm_map = build_norm_map(work)
    plan = plan_rms_conversion(work, norm_map, rec.target, policy)
    status("folding in float64")
    apply_rms_plan(work, plan, rec.steps)
    work.to(out_dtype)
    t_convert = time.perf_counter() - t0

    with dest.staging() as tmp:
        status("writing safetensors")
        state = work.state_dict()
        shards = write_safetensors(state, tmp, max_bytes, {"normsurgeon_recipe": rec.name})
        cfg = _config_json(src, plan, rec, out_dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        copied = copy_tagalong_files(src.path, tmp)
        resolved = {"recipe": rec.model_dump(), "bias_policy": policy, "plan": plan.to_dict()}
        (tmp / "normsurgeon_recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        report: dict = {"status": "not-verified"}
        if run_verify:
            status("verifying the written checkpoint")
            fresh_src = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            report = verify_loaded(fresh_src, load_model(str(tmp)), num=rec.verify.num_sequences,
                                   seq_len=rec.verify.seq_len, seed=rec.verify.seed, text_file=text_file)
            if plan.stock_loadable:
                stock_src = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
                stock = verify_loaded(stock_src, load_model(str(tmp), stock=True), num=rec.verify.num_sequences,
                                      seq_len=rec.verify.seq_len, seed=rec.verify.seed, text_file=text_file)
                report["stock_load"] = {"status": stock["status"], "loaded_as": stock["output"]["loaded_as"],
                                        "metrics": stock["metrics"]}
                if stock["status"] != "pass":
                    report["status"] = "fail"
            report["output"]["path"] = str(out)
        report.update({
            "tool": _versions(),
            "recipe": {"name": rec.name, "target": rec.target, "bias_policy": policy},
            "plan": {"untied": [r for r, _ in plan.untie], "baked": [n for n, _ in plan.bake],
                     "centred_writers": len(plan.center), "folded_norms": sum(f.fold_gain for f in plan.folds),
                     "kept_on_norm": {f.norm: f.reason for f in plan.folds if not f.fold_gain},
                     "created_bias": sorted(set(plan.created_bias)), "notes": plan.notes},
            "inventory": {**_inventory(before, state), "shards": shards, "tagalong": copied},
            "stock_loadable": plan.stock_loadable,
            "norm_placement": norm_map.placement,
        })
        report.setdefault("source", {"ref": model})
        report.setdefault("output", {"path": str(out)})
        report["output"].update({"dtype": dtype_name(out_dtype), "format": f"pre-{plan.target}"})
        report["timing_s"] = {**report.get("timing_s", {}), "convert": round(t_convert, 3),
                              "total": round(time.perf_counter() - t0, 3)}
        write_report(report, tmp)
        if report["status"] == "fail":
            raise VerificationFailed(f"verification failed, nothing written: {failure_line(report)}", report)
    return report


def _versions() -> dict:
    import safetensors
    import transformers

    return {"normsurgeon": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}
