"""``convert``: Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm, written as a Hugging Face folder with a report.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "rms"
>>> report = convert("normsurgeon.testing:tiny_gpt2", out, to="rmsnorm")
>>> report["status"], (out / "model.safetensors").is_file()
('pass', True)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from normsurgeon.conversion_output import (config_json, load_conversion_recipe, parse_dtype,  # noqa: F401
                                           tool_versions, write_conversion_card)
from normsurgeon.errors import VerificationFailed
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.io.destination import Destination, claim_output
from normsurgeon.io.loader import load_model
from normsurgeon.io.writer import copy_tagalong_files, parse_size
from normsurgeon.recipes import Recipe
from normsurgeon.stream.execute import PROGRESS, execute_plan
from normsurgeon.stream.malloc_tuning import tune_malloc
from normsurgeon.stream.plan import plan_in_memory
from normsurgeon.verification.metrics import dtype_name
from normsurgeon.verification.report import failure_line, write_report
from normsurgeon.verification.written import verify_written

def convert(model: str, out: str | Path, *, to: str = "rmsnorm", recipe: str | Path | None = None,
            dtype: str | None = None, bias_policy: str | None = None, overwrite: bool = False,
            run_verify: bool = True, text_file: Path | None = None, max_shard_size: str | int = "5GB",
            allow_pickle: bool = False, trust_remote_code: bool = False, max_logprob_delta: float | None = None,
            status: Callable[[str], None] = lambda s: None, progress: Callable[..., None] | None = None) -> dict:
    """Convert ``model`` exactly and write it to ``out``; return the equivalence report.

    ``max_logprob_delta``: verify against this max |delta log-prob| instead of the output dtype's own
    threshold (recorded in the report). A cast to a lower precision is judged against the cast itself.
    ``progress("convert", done, total, unit="B")``: called as the shards are written.

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
                        trust_remote_code, status, t0, max_logprob_delta, progress)


def _convert(model: str, dest: Destination, rec: Recipe, policy: str, max_bytes: int,
             out_dtype_req: torch.dtype | None, run_verify: bool, text_file: Path | None, allow_pickle: bool,
             trust_remote_code: bool, status: Callable[[str], None], t0: float,
             max_logprob_delta: float | None = None, progress: Callable[..., None] | None = None) -> dict:
    out = dest.path
    if run_verify:
        # Verification allocates and frees tensors of tens of MB (logits, one output block at a time):
        # a fixed mmap threshold returns them to the system instead of fragmenting the heap
        # (stream/malloc_tuning.py; GPT-2 small with verification: 1.56 -> 1.21 GiB peak).
        tune_malloc()
    status("loading the source model")
    src = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    out_dtype = out_dtype_req or src.dtype

    status("mapping norms from the dataflow")
    # The model as loaded: the plan does not depend on its dtype (tests/test_one_engine.py), and the
    # engine reads each tensor once, computes in float64 and casts once; the source stays unmodified.
    norm_map = build_norm_map(src.model)
    sp = plan_in_memory(src.model, rec.target, policy, out_dtype, rec.steps, norm_map=norm_map, config=src.config,
                        source=src.path)
    plan = sp.rms_plan

    with dest.staging() as tmp:
        status("folding in float64 and writing safetensors")
        stats = execute_plan(sp, tmp, max_bytes, {"normsurgeon_recipe": rec.name}, resume=False,
                             tensors=src.model.state_dict(), direct=False, progress=progress)
        (tmp / PROGRESS).unlink(missing_ok=True)
        t_convert = time.perf_counter() - t0
        cfg = config_json(src.config, type(src.model).__name__, src.kind == "factory", plan, rec, out_dtype,
                          rec.steps)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        copied = copy_tagalong_files(src.path, tmp)
        resolved = {"recipe": rec.model_dump(), "bias_policy": policy, "plan": plan.to_dict()}
        (tmp / "normsurgeon_recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        report: dict = {"status": "not-verified"}
        if run_verify:
            status("verifying the written checkpoint")
            report = verify_written(src, tmp, plan.stock_loadable, rec.verify, text_file, max_logprob_delta)
            report["output"]["path"] = str(out)
        report.update({
            "tool": tool_versions(),
            "recipe": {"name": rec.name, "target": rec.target, "bias_policy": policy},
            "plan": {"untied": [r for r, _ in plan.untie], "baked": [n for n, _ in plan.bake],
                     "centred_writers": len(plan.center), "folded_norms": sum(f.fold_gain for f in plan.folds),
                     "kept_on_norm": {f.norm: f.reason for f in plan.folds if not f.fold_gain},
                     "created_bias": sorted(set(plan.created_bias)), "notes": plan.notes},
            "inventory": {**sp.inventory["counts"], "added": sp.inventory["added"],
                          "dropped": sp.inventory["dropped"], "shards": stats["shards"], "tagalong": copied},
            "stock_loadable": plan.stock_loadable,
            "norm_placement": norm_map.placement,
        })
        report.setdefault("source", {"ref": model})
        report.setdefault("output", {"path": str(out)})
        report["output"].update({"dtype": dtype_name(out_dtype), "format": f"pre-{plan.target}"})
        report["timing_s"] = {**report.get("timing_s", {}), "convert": round(t_convert, 3),
                              "total": round(time.perf_counter() - t0, 3)}
        write_report(report, tmp)
        write_conversion_card(tmp, model, src.path, plan, rec, report, out)
        if report["status"] == "fail":
            raise VerificationFailed(f"verification failed, nothing written: {failure_line(report)}", report)
    return report
