"""Check both folded forms against the source on the same inputs.

Thresholds (issue 3): float64 max|delta| <= 1e-10 (deploy form computed in float64 before the cast);
source dtype max|delta| <= tolerance * max|source output| (1e-4 for float32) and identical top-1.

>>> import torch
>>> a = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
>>> m = output_diff(a, a + 1e-6)
>>> m["top1_agreement"], m["max_abs"] < 2e-6
(1.0, True)
"""
from __future__ import annotations

from typing import Any

import torch

from normsurgeon.batchnorm.fold import copy_f64

REL_TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
F64_TOL = 1e-10


def output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state", "pooler_output"):
        if isinstance(getattr(out, attr, None), torch.Tensor):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def output_diff(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """max|delta|, max|delta| / max|ref| and top-1 agreement over the last axis."""
    ref, got = ref.detach().double(), got.detach().double()
    scale = ref.abs().max().item()
    diff = (ref - got).abs().max().item()
    top1 = 1.0
    if ref.dim() >= 2 and ref.shape[-1] > 1:
        two = ref.topk(2, dim=-1).values
        decided = (two[..., 0] - two[..., 1]) > 2 * diff  # a near-tie within the error may flip
        agree = (ref.argmax(-1) == got.argmax(-1))[decided]
        top1 = agree.double().mean().item() if agree.numel() else 1.0
    return {"max_abs": diff, "rel_to_scale": diff / scale if scale > 0 else diff, "top1_agreement": top1,
            "output_scale": scale}


def _run(model: torch.nn.Module, batch: dict | tuple, to64: bool = False) -> torch.Tensor:
    def conv(v):
        return v.double() if to64 and isinstance(v, torch.Tensor) and v.is_floating_point() else v
    with torch.no_grad():
        if isinstance(batch, dict):
            return output_tensor(model(**{k: conv(v) for k, v in batch.items()}))
        return output_tensor(model(*[conv(v) for v in batch]))


def _merge(acc: dict, m: dict) -> dict:
    if not acc:
        return dict(m)
    return {"max_abs": max(acc["max_abs"], m["max_abs"]), "rel_to_scale": max(acc["rel_to_scale"], m["rel_to_scale"]),
            "top1_agreement": min(acc["top1_agreement"], m["top1_agreement"]),
            "output_scale": max(acc["output_scale"], m["output_scale"])}


def verify_fold(source: torch.nn.Module, result, batches: list, dtype_name: str) -> dict:
    """Per form: metrics and pass/fail. ``status`` is "pass" only if every form passes."""
    src64 = copy_f64(source)
    forms: dict[str, dict] = {"deploy_float64": {}, "deploy": {}, "stock": {}}
    for batch in batches:
        ref, ref64 = _run(source, batch), _run(src64, batch, to64=True)
        forms["deploy_float64"] = _merge(forms["deploy_float64"], output_diff(ref64, _run(result.deploy64, batch, True)))
        forms["deploy"] = _merge(forms["deploy"], output_diff(ref, _run(result.deploy, batch)))
        forms["stock"] = _merge(forms["stock"], output_diff(ref, _run(result.stock, batch)))
    tol = REL_TOL.get(dtype_name, 1e-4)
    forms["deploy_float64"]["threshold"] = {"max_abs": F64_TOL}
    forms["deploy_float64"]["ok"] = forms["deploy_float64"]["max_abs"] <= F64_TOL
    for key in ("deploy", "stock"):
        forms[key]["threshold"] = {"rel_to_scale": tol, "top1_agreement": 1.0}
        forms[key]["ok"] = forms[key]["rel_to_scale"] <= tol and forms[key]["top1_agreement"] == 1.0
    status = "pass" if all(f["ok"] for f in forms.values()) else "fail"
    return {"status": status, "forms": forms, "dtype": dtype_name}
