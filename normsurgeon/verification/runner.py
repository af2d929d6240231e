"""Run a source and a converted model on the same inputs and measure how far apart they are.

The residual stream is compared at every converted norm's input (the source's is centred first), which
locates a bad fold to the block where it happens.

>>> import copy, torch
>>> from normsurgeon.testing import tiny_gpt2
>>> a = tiny_gpt2(); b = copy.deepcopy(a)
>>> r = compare_models(a, b, [{"input_ids": torch.arange(8)[None]}], torch.float64, [])
>>> r["metrics"]["max_abs_logprob"]
0.0
"""
from __future__ import annotations

from typing import Any

import torch

from normsurgeon.dtype_context import default_dtype_for
from normsurgeon.errors import InputError
from normsurgeon.io.example_inputs import accepts
from normsurgeon.verification.metrics import output_metrics, residual_error


def _output_tensor(out: Any) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def _no_cache(model: torch.nn.Module, batch: dict) -> dict:
    """``batch`` with ``use_cache=False`` where the model's forward takes it (never an argument it does not)."""
    return {**batch, "use_cache": False} if accepts(model, "use_cache") else batch


def _capture(model: torch.nn.Module, points: list[str], store: dict[str, torch.Tensor]) -> list:
    hooks = []
    for name in points:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue

        def hook(m, args, name=name):
            store[name] = args[0].detach()

        hooks.append(mod.register_forward_pre_hook(hook))
    return hooks


def merge_metrics(parts: list[dict]) -> dict:
    """Per-batch ``output_metrics`` (each with its ``positions``) as one: worst case for errors, weighted
    mean over positions for KL and top-1 agreement."""
    agg: dict[str, float] = {}
    weighted = set()
    for m in parts:
        for k, v in m.items():
            if k == "positions":
                continue
            if k.startswith("top1") or k == "mean_kl":  # summed here, divided once below (1.0 stays 1.0)
                agg[k] = agg.get(k, 0.0) + v * m["positions"]
                weighted.add(k)
            else:
                agg[k] = max(agg.get(k, 0.0), v)
    positions = sum(m["positions"] for m in parts)
    return {k: v / max(positions, 1) if k in weighted else v for k, v in agg.items()}


def compare_models(source: torch.nn.Module, converted: torch.nn.Module, batches: list[dict],
                   compute_dtype: torch.dtype, residual_points: list[str], margin: float = 0.0, *,
                   roundoff: bool = False, cast_to: torch.dtype | None = None) -> dict:
    """Both models are cast to ``compute_dtype`` in place and run in eval mode without cache.

    From the same source outputs: ``roundoff`` adds ``source_roundoff``, max |log-prob(source in float64)
    - log-prob(source)| (the float64 side module by module, ``roundoff.float64_forward``; None when a
    kernel has no float64 version); ``cast_to`` adds ``cast``, the metrics of the source with its weights
    rounded to that dtype against the source (what a plain cast costs).
    """
    from normsurgeon.verification.roundoff import float64_output, max_logprob_gap, rounded_forward

    source.to(compute_dtype).eval()
    converted.to(compute_dtype).eval()
    parts: list[dict] = []
    cast_parts: list[dict] = []
    gap: float | None = 0.0
    per_point: dict[str, dict] = {}
    for batch in batches:
        batch = {k: (v.to(compute_dtype) if v.is_floating_point() else v) for k, v in batch.items()}
        s_store: dict[str, torch.Tensor] = {}
        c_store: dict[str, torch.Tensor] = {}
        hooks = _capture(source, residual_points, s_store) + _capture(converted, residual_points, c_store)
        try:
            with torch.no_grad():
                s_out = model_output(source, batch)
                c_out = model_output(converted, batch)
        finally:
            for h in hooks:
                h.remove()
        if s_out.shape != c_out.shape:
            raise InputError(f"the models' outputs have different shapes ({tuple(s_out.shape)} vs "
                             f"{tuple(c_out.shape)}): they are not a source and its conversion")
        parts.append(output_metrics(s_out, c_out, margin))
        if roundoff and gap is not None:
            try:
                gap = max(gap, max_logprob_gap(float64_output(source, batch, model_output), s_out))
            except RuntimeError:  # a kernel without a float64 version (PhiMoE's experts): no round-off scale
                gap = None
        if cast_to is not None:
            with torch.no_grad(), rounded_forward(source, cast_to):
                cast_parts.append(output_metrics(s_out, model_output(source, batch), margin))
        for name in residual_points:
            if name in s_store and name in c_store:
                e = residual_error(s_store[name], c_store[name])
                prev = per_point.get(name)
                if prev is None or e["resid_rel_l2"] > prev["resid_rel_l2"]:
                    per_point[name] = e
    per_layer = [{"point": name, **per_point[name]} for name in residual_points if name in per_point]
    result = {"metrics": merge_metrics(parts), "per_layer": per_layer,
              "positions": sum(m["positions"] for m in parts)}
    if roundoff:
        result["source_roundoff"] = gap
    if cast_to is not None:
        c = merge_metrics(cast_parts)
        result["cast"] = {k: c[k] for k in ("max_abs_logprob", "mean_kl", "top1_agreement")}
    return result


def model_output(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The output tensor of ``model`` on ``batch`` (no cache; torch's default dtype follows a float64 model)."""
    with default_dtype_for(model):
        return _output_tensor(model(**_no_cache(model, batch)))
