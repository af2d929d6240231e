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


def compare_models(source: torch.nn.Module, converted: torch.nn.Module, batches: list[dict],
                   compute_dtype: torch.dtype, residual_points: list[str], margin: float = 0.0) -> dict:
    """Both models are cast to ``compute_dtype`` in place and run in eval mode without cache."""
    source.to(compute_dtype).eval()
    converted.to(compute_dtype).eval()
    agg: dict[str, float] = {}
    per_point: dict[str, dict] = {}
    positions = 0
    for batch in batches:
        batch = {k: (v.to(compute_dtype) if v.is_floating_point() else v) for k, v in batch.items()}
        s_store: dict[str, torch.Tensor] = {}
        c_store: dict[str, torch.Tensor] = {}
        hooks = _capture(source, residual_points, s_store) + _capture(converted, residual_points, c_store)
        try:
            with torch.no_grad(), default_dtype_for(source):
                s_out = _output_tensor(source(**_no_cache(source, batch)))
                c_out = _output_tensor(converted(**_no_cache(converted, batch)))
        finally:
            for h in hooks:
                h.remove()
        if s_out.shape != c_out.shape:
            raise InputError(f"the models' outputs have different shapes ({tuple(s_out.shape)} vs "
                             f"{tuple(c_out.shape)}): they are not a source and its conversion")
        m = output_metrics(s_out, c_out, margin)
        n = m.pop("positions")
        for k, v in m.items():
            if k.startswith("top1") or k == "mean_kl":
                agg[k] = agg.get(k, 0.0) + v * n
            else:
                agg[k] = max(agg.get(k, 0.0), v)
        positions += n
        for name in residual_points:
            if name in s_store and name in c_store:
                e = residual_error(s_store[name], c_store[name])
                prev = per_point.get(name)
                if prev is None or e["resid_rel_l2"] > prev["resid_rel_l2"]:
                    per_point[name] = e
    for k in ("top1_agreement", "top1_agreement_all", "mean_kl"):
        agg[k] = agg[k] / max(positions, 1)
    per_layer = [{"point": name, **per_point[name]} for name in residual_points if name in per_point]
    return {"metrics": agg, "per_layer": per_layer, "positions": positions}


def model_output(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The output tensor of ``model`` on ``batch`` (no cache; torch's default dtype follows a float64 model)."""
    with default_dtype_for(model):
        return _output_tensor(model(**_no_cache(model, batch)))


def roundoff_gap(model: torch.nn.Module, batches: list[dict]) -> float:
    """max |log-prob(model in float64) - log-prob(model in its dtype)|: the model's own round-off on these
    inputs, with the float64 side computed module by module (``roundoff.float64_forward``), not on a copy."""
    from normsurgeon.verification.roundoff import float64_logprobs

    def run(m: torch.nn.Module, x: dict) -> torch.Tensor:
        return _output_tensor(m(**_no_cache(m, x)))

    gap = 0.0
    dt = next(model.parameters()).dtype
    for batch in batches:
        x = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in batch.items()}
        with torch.no_grad(), default_dtype_for(model):
            native = run(model, x).double().log_softmax(-1)
        gap = max(gap, (float64_logprobs(model, batch, run) - native).abs().max().item())
    return gap
