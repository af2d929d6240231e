"""``rotate``: convert (Pre-LN -> Pre-RMSNorm, or fold an RMSNorm model's gains), then rotate the residual
stream by an orthogonal Q; write a Hugging Face folder and verify it against the source.

Q keeps the all-ones direction (``Q 1 = 1``) when the converted model's norms assume a zero-mean stream
(every Pre-LN source: GPT-2, OPT, BLOOM, ...), so the stock LayerNorm still computes RMSNorm and the
output stays stock-loadable; an RMSNorm source (Llama, Qwen2, Mistral, Gemma) takes any Q.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "rot"
>>> report = rotate("normsurgeon.testing:tiny_gpt2", out, method="hadamard", seed=0)
>>> report["status"], report["rotation"]["mean_preserving"], report["stock_loadable"]
('pass', True, True)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch

from normsurgeon import __version__
from normsurgeon.errors import UnsupportedModel, UsageError, VerificationFailed
from normsurgeon.graph.normmap import NormMap, build_norm_map
from normsurgeon.io.destination import claim_output
from normsurgeon.io.formats import CUSTOM_PREFIX
from normsurgeon.io.loader import LoadedModel, load_model
from normsurgeon.io.writer import copy_tagalong_files, parse_size, write_safetensors
from normsurgeon.recipes import recipe_for_target
from normsurgeon.rotation.apply import fold_rms_gains, rotate_model
from normsurgeon.rotation.exact_norms import exact_pair
from normsurgeon.rotation.orthogonal import METHODS, is_orthogonal, keeps_ones, rotation_matrix
from normsurgeon.rotation.plan import RotationPlan, plan_rotation
from normsurgeon.transforms.apply import apply_rms_plan
from normsurgeon.transforms.plan import RmsPlan, plan_rms_conversion
from normsurgeon.verification.api import verify_loaded
from normsurgeon.verification.metrics import dtype_name
from normsurgeon.verification.report import failure_line, write_report

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Rotated:
    """A rotated model in memory (float64) and how it was made."""

    model: torch.nn.Module
    plan: RmsPlan
    rotation_plan: RotationPlan
    q: torch.Tensor  # [d, d] float64, x -> x Q
    info: dict
    norm_map: NormMap | None = None  # the source's, as traced


def rotate_in_memory(model: torch.nn.Module, *, method: str = "hadamard", seed: int = 0,
                     mean_preserving: bool | None = None, to: str = "rmsnorm", bias_policy: str = "stock",
                     q: torch.Tensor | None = None) -> Rotated:
    """Convert and rotate a float64 copy of ``model`` (``model`` itself is not changed).

    ``mean_preserving=None`` chooses: True for a converted Pre-LN model (required: its norms assume a
    zero-mean stream), False for an RMSNorm model. ``q`` overrides the constructed matrix.
    """
    if method not in METHODS:
        raise UsageError(f"unknown rotation method {method!r} (choose from {', '.join(METHODS)})")
    if to != "rmsnorm":
        raise UsageError(f"rotate writes the Pre-RMSNorm form; --to {to} is not supported")
    work = copy.deepcopy(model).to(torch.float64).eval()
    nm = build_norm_map(work)
    plan = plan_rms_conversion(work, nm, to, bias_policy)
    rplan = plan_rotation(work, nm, plan)
    if mean_preserving is None:
        mean_preserving = rplan.mean_preserving
    elif rplan.mean_preserving and not mean_preserving:
        raise UnsupportedModel(f"cannot rotate {nm.model_class} with a Q that moves the all-ones direction: its "
                               "converted norms (stock LayerNorm; normsurgeon's RMSNorm on CPU) need a zero-mean "
                               "stream; use the mean-preserving Q")
    if plan.source_family == "rmsnorm":
        fold_rms_gains(work, plan)  # nothing centred, no module replaced: the stock norms keep unit gain
    else:
        apply_rms_plan(work, plan)
    if q is None:
        q, info = rotation_matrix(plan.hidden_size, method, seed, mean_preserving)
    else:
        q = q.to(torch.float64)
        if not is_orthogonal(q, 1e-9):
            raise UsageError("the given Q is not orthogonal")
        if mean_preserving and not keeps_ones(q, 1e-9):
            raise UnsupportedModel(f"cannot rotate {nm.model_class} with the given Q: it moves the all-ones "
                                   "direction, and the converted norms need a zero-mean stream")
        info = {"requested": "given", "method": "given", "seed": None, "size": int(q.shape[0]),
                "mean_preserving": bool(mean_preserving), "note": ""}
    rotate_model(work, rplan, q)
    return Rotated(work, plan, rplan, q, info, nm)


def _section(src: LoadedModel, rot: Rotated, stock_loadable: bool) -> dict:
    plan = rot.plan
    return {
        "format": "pre-rmsnorm",
        "version": 1,
        "normsurgeon_version": __version__,
        "recipe": "rotate",
        "source_model_type": src.config.get("model_type"),
        "source_architecture": type(src.model).__name__,
        "stock_loadable": stock_loadable,
        "rmsnorm": plan.replace,
        "gain_offset": plan.gain_offsets,
        "identity": [n for n, _ in plan.bake],
        "centred": plan.recentre,
        "created_bias": sorted(set(plan.created_bias)),
        "crms": None,
        "rotation": {k: rot.info[k] for k in ("method", "requested", "seed", "size", "mean_preserving", "note")}
        | {"source_family": plan.source_family},
    }


def _config_json(src: LoadedModel, rot: Rotated, dtype: torch.dtype, stock_loadable: bool) -> dict:
    cfg = dict(src.config)
    cfg["dtype"] = dtype_name(dtype)
    cfg.pop("torch_dtype", None)
    if rot.plan.untie:
        cfg["tie_word_embeddings"] = False
    cfg["normsurgeon"] = _section(src, rot, stock_loadable)
    if not stock_loadable and cfg.get("model_type"):
        cfg["model_type"] = CUSTOM_PREFIX + cfg["model_type"]  # stock transformers must refuse it loudly
    if src.kind == "factory" and not cfg.get("architectures"):
        cfg["architectures"] = [type(src.model).__name__]
    return cfg


def rotate(model: str, out: str | Path, *, method: str = "hadamard", seed: int = 0, to: str = "rmsnorm",
           mean_preserving: bool | None = None, dtype: str | None = None, bias_policy: str = "stock",
           overwrite: bool = False, run_verify: bool = True, text_file: Path | None = None,
           max_shard_size: str | int = "5GB", allow_pickle: bool = False, trust_remote_code: bool = False,
           status: Callable[[str], None] = lambda s: None) -> dict:
    """Convert ``model``, rotate its residual stream by an orthogonal Q, write ``out``; return the report.

    Raises UnsupportedModel (nothing written) when the model cannot be rotated exactly, UsageError for
    bad options or an existing ``out``, VerificationFailed (nothing written) when the output does not
    reproduce the source.
    """
    t0 = time.perf_counter()
    if dtype is not None and dtype != "source" and dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose from source, {', '.join(_DTYPES)})")
    if method not in METHODS:
        raise UsageError(f"unknown rotation method {method!r} (choose from {', '.join(METHODS)})")
    rec = recipe_for_target(to) if to in ("rmsnorm", "crmsnorm") else None
    if rec is None or to != "rmsnorm":
        raise UsageError(f"rotate writes the Pre-RMSNorm form; --to {to} is not supported")
    out = Path(out)
    with claim_output(out, inputs=[model, text_file], overwrite=overwrite, status=status) as dest:
        status("loading the source model")
        src = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        out_dtype = _DTYPES[dtype] if dtype not in (None, "source") else src.dtype
        status("converting and rotating in float64")
        rot = rotate_in_memory(src.model, method=method, seed=seed, mean_preserving=mean_preserving, to=to,
                               bias_policy=bias_policy)
        stock_loadable = rot.plan.stock_loadable and (rot.info["mean_preserving"]
                                                      or rot.plan.source_family == "rmsnorm")
        rot.model.to(out_dtype)
        t_rotate = time.perf_counter() - t0
        with dest.staging() as tmp:
            status("writing safetensors")
            write_safetensors(rot.model.state_dict(), tmp, parse_size(max_shard_size),
                              {"normsurgeon_recipe": "rotate"})
            cfg = _config_json(src, rot, out_dtype, stock_loadable)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
            copied = copy_tagalong_files(src.path, tmp)
            report: dict = {"status": "not-verified"}
            if run_verify:
                report = _verify(model, tmp, rec, text_file, allow_pickle, trust_remote_code, stock_loadable,
                                 out_dtype, status, rot.norm_map)
            report.update({
                "rotation": cfg["normsurgeon"]["rotation"],
                "plan": {"source_family": rot.plan.source_family, "untied": [r for r, _ in rot.plan.untie],
                         "baked": [n for n, _ in rot.plan.bake], "centred_writers": len(rot.plan.center),
                         "folded_norms": sum(f.fold_gain for f in rot.plan.folds),
                         "rotated_writers": len(rot.rotation_plan.writers),
                         "rotated_readers": len(rot.rotation_plan.readers),
                         "gains_folded_by_rotation": sorted(rot.rotation_plan.gain_folds),
                         "notes": rot.plan.notes + rot.rotation_plan.notes + ([rot.info["note"]] if rot.info["note"]
                                                                              else [])},
                "stock_loadable": stock_loadable,
                "tagalong": copied,
            })
            report.setdefault("source", {"ref": model})
            report.setdefault("output", {})
            report["output"].update({"path": str(out), "dtype": dtype_name(out_dtype), "format": "pre-rmsnorm"})
            report["timing_s"] = {**report.get("timing_s", {}), "rotate": round(t_rotate, 3),
                                  "total": round(time.perf_counter() - t0, 3)}
            write_report(report, tmp)
            if report["status"] == "fail":
                raise VerificationFailed(f"verification failed, nothing written: {failure_line(report)}", report)
    return report


def _verify(model: str, folder: Path, rec, text_file, allow_pickle: bool, trust_remote_code: bool,
            stock_loadable: bool, out_dtype: torch.dtype, status: Callable[[str], None], nm: NormMap | None) -> dict:
    status("verifying the written checkpoint")
    v = rec.verify
    src = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    conv = load_model(str(folder))
    swapped = exact_pair(src.model, conv.model, nm) if out_dtype == torch.float64 else []
    report = verify_loaded(src, conv, num=v.num_sequences, seq_len=v.seq_len, seed=v.seed, text_file=text_file)
    report["float64_exact_norms"] = swapped  # norms computing in float32 inside, swapped in both models
    # the per-norm residual comparison sets the source's stream beside the rotated one (x vs x Q): not an error
    report["per_layer"], report["worst_residual_point"] = [], None
    if stock_loadable:
        src2 = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        stock = load_model(str(folder), stock=True)
        if swapped:  # the stock class rounds to float32 in its norms: check it where that is the precision
            src2.model.float()
            stock.model.float()
            src2, stock = dataclasses.replace(src2, dtype=torch.float32), dataclasses.replace(stock, dtype=torch.float32)
        s = verify_loaded(src2, stock, num=v.num_sequences, seq_len=v.seq_len, seed=v.seed, text_file=text_file)
        report["stock_load"] = {"status": s["status"], "loaded_as": s["output"]["loaded_as"],
                                "compute_dtype": s["inputs"]["compute_dtype"], "metrics": s["metrics"]}
        if s["status"] != "pass":
            report["status"] = "fail"
    return report
