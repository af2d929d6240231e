"""Check both folded forms against the source on the same inputs, on *every* output tensor.

A model's output is flattened into named floating tensors (``logits``; a backbone's ``feature_maps.0``,
``feature_maps.1``...; ``predicted_depth``; ``last_hidden_state`` and ``extract_features``...), each
compared on its own scale; the worst one is reported.

Thresholds (issue 3), per output tensor: float64 max|delta| / max(1, max|source output|) <= 1e-10 (deploy
form computed in float64 before the cast; ``max_abs_norm``); source dtype max|delta| <= tolerance * max|source output|
(1e-4 for float32) and identical top-1.

>>> import torch
>>> a = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
>>> m = output_diff(a, a + 1e-6)
>>> m["top1_agreement"], m["max_abs"] < 2e-6
(1.0, True)
>>> sorted(output_tensors({"maps": (a, a), "ids": torch.tensor([1]), "x": a}))
['maps.0', 'maps.1', 'x']
"""
from __future__ import annotations

from typing import Any

import torch

from normsurgeon.batchnorm.fold import copy_f64

REL_TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
F64_TOL = 1e-10


def output_tensors(out: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every floating tensor in a model output, by path: ModelOutput fields (``None`` ones are absent),
    tuples/lists by index, dicts by key. Integer and boolean tensors (masks, ids) are left out."""
    if isinstance(out, torch.Tensor):
        return {prefix or "output": out} if out.is_floating_point() else {}
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # transformers ModelOutput (an ordered dict)
        items = [(k, out[k]) for k in out.keys()]
    elif isinstance(out, dict):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    else:
        return {}
    found: dict[str, torch.Tensor] = {}
    for k, v in items:
        found.update(output_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return found


def output_tensor(out: Any) -> torch.Tensor:
    """The primary output tensor (``logits``, ``last_hidden_state``..., else the first floating one)."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state", "pooler_output", "predicted_depth"):
        if isinstance(getattr(out, attr, None), torch.Tensor):
            return getattr(out, attr)
    found = output_tensors(out)
    if not found:
        raise TypeError(f"cannot find an output tensor in {type(out).__name__}")
    return next(iter(found.values()))


def output_diff(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """max|delta|, max|delta| / max|ref| and top-1 agreement over the last axis."""
    ref, got = ref.detach().double(), got.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (ref - got).abs().max().item() if ref.numel() else 0.0
    if not torch.isfinite(got).all() and torch.isfinite(ref).all():
        diff = float("inf")
    top1 = 1.0
    if ref.dim() >= 2 and ref.shape[-1] > 1:
        two = ref.topk(2, dim=-1).values
        decided = (two[..., 0] - two[..., 1]) > 2 * diff  # a near-tie within the error may flip
        agree = (ref.argmax(-1) == got.argmax(-1))[decided]
        top1 = agree.double().mean().item() if agree.numel() else 1.0
    return {"max_abs": diff, "rel_to_scale": diff / scale if scale > 0 else diff, "top1_agreement": top1,
            "output_scale": scale}


def outputs_diff(ref: Any, got: Any) -> dict:
    """``output_diff`` on every floating output tensor of ``ref``: the worst of each measure, the tensor
    with the worst ``rel_to_scale`` and the number compared. ``max_abs_norm`` is max|delta| / max(1, scale)
    per tensor (the float64 measure). A tensor missing from ``got`` or of another shape is an infinite error."""
    refs, gots = output_tensors(ref), output_tensors(got)
    if not refs:
        raise TypeError(f"cannot find a floating output tensor in {type(ref).__name__}")
    acc: dict = {}
    for name, r in refs.items():
        g = gots.get(name)
        if g is None or g.shape != r.shape:
            m = {"max_abs": float("inf"), "rel_to_scale": float("inf"), "top1_agreement": 0.0,
                 "output_scale": r.detach().abs().max().item() if r.numel() else 0.0}
        else:
            m = output_diff(r, g)
        m["max_abs_norm"] = m["max_abs"] / max(1.0, m["output_scale"])
        m["worst_output"] = name
        acc = _merge(acc, m)
    acc["outputs_compared"] = len(refs)
    return acc


def _run(model: torch.nn.Module, batch: dict | tuple, to64: bool = False) -> Any:
    def conv(v):
        return v.double() if to64 and isinstance(v, torch.Tensor) and v.is_floating_point() else v
    with torch.no_grad():
        if isinstance(batch, dict):
            return model(**{k: conv(v) for k, v in batch.items()})
        return model(*[conv(v) for v in batch])


def _merge(acc: dict, m: dict) -> dict:
    """The worst of two measurements (``worst_output`` follows ``rel_to_scale``)."""
    if not acc:
        return dict(m)
    out = {"max_abs": max(acc["max_abs"], m["max_abs"]), "rel_to_scale": max(acc["rel_to_scale"], m["rel_to_scale"]),
           "max_abs_norm": max(acc["max_abs_norm"], m["max_abs_norm"]),
           "top1_agreement": min(acc["top1_agreement"], m["top1_agreement"]),
           "output_scale": max(acc["output_scale"], m["output_scale"]),
           "worst_output": m["worst_output"] if m["rel_to_scale"] > acc["rel_to_scale"] else acc["worst_output"]}
    out["outputs_compared"] = max(acc.get("outputs_compared", 0), m.get("outputs_compared", 0))
    return out


def verify_fold(source: torch.nn.Module, result, batches: list, dtype_name: str) -> dict:
    """Per form: metrics and pass/fail. ``status`` is "pass" only if every form passes."""
    src64 = copy_f64(source)
    forms: dict[str, dict] = {"deploy_float64": {}, "deploy": {}, "stock": {}}
    for batch in batches:
        ref, ref64 = _run(source, batch), _run(src64, batch, to64=True)
        forms["deploy_float64"] = _merge(forms["deploy_float64"], outputs_diff(ref64, _run(result.deploy64, batch, True)))
        forms["deploy"] = _merge(forms["deploy"], outputs_diff(ref, _run(result.deploy, batch)))
        forms["stock"] = _merge(forms["stock"], outputs_diff(ref, _run(result.stock, batch)))
    tol = REL_TOL.get(dtype_name, 1e-4)
    f64 = forms["deploy_float64"]
    f64["threshold"] = {"max_abs_norm": F64_TOL}  # max|delta| / max(1, max|output|), per output tensor
    f64["ok"] = f64["max_abs_norm"] <= F64_TOL
    for key in ("deploy", "stock"):
        forms[key]["threshold"] = {"rel_to_scale": tol, "top1_agreement": 1.0}
        forms[key]["ok"] = forms[key]["rel_to_scale"] <= tol and forms[key]["top1_agreement"] == 1.0
    status = "pass" if all(f["ok"] for f in forms.values()) else "fail"
    return {"status": status, "forms": forms, "dtype": dtype_name}
