"""Every supported family converts exactly: float64 in memory (<= 1e-10) and float32 through disk (<= 1e-4).

Models have randomised norm gains/shifts and non-zero linear biases (tests/model_zoo.py).
"""
from __future__ import annotations

import copy

import pytest
import torch

from model_zoo import FAMILIES, build, model_inputs
from normsurgeon.conversion import convert
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.transforms.apply import apply_rms_plan
from normsurgeon.transforms.plan import plan_rms_conversion

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _logprobs(model, inputs):
    return model(**inputs).logits.double().log_softmax(-1)


@pytest.mark.parametrize("target", ["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float64_conversion_is_exact(family, target):
    src = build(family).double()
    inputs = model_inputs(src)
    with torch.no_grad():
        ref = _logprobs(src, inputs)
        work = copy.deepcopy(src)
        plan = plan_rms_conversion(work, build_norm_map(work), target)
        apply_rms_plan(work, plan)
        out = _logprobs(work, inputs)
    assert (out - ref).abs().max().item() <= TOL[torch.float64]
    # Guard against a converter that does nothing: the norms really were replaced.
    assert not any(isinstance(m, torch.nn.LayerNorm) for n, m in work.named_modules() if n in plan.replace)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_residual_stream_is_zero_mean_after_conversion(family):
    src = build(family).double()
    work = copy.deepcopy(src)
    nm = build_norm_map(work)
    plan = plan_rms_conversion(work, nm, "rmsnorm")
    apply_rms_plan(work, plan)
    seen = {}
    hooks = [work.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0])) for n in plan.replace]
    with torch.no_grad():
        work(**model_inputs(work))
    for h in hooks:
        h.remove()
    for name, x in seen.items():
        rel = (x.mean(-1).abs().max() / x.abs().max()).item()
        assert rel < 1e-12, f"{name}: residual mean {rel}"


@pytest.mark.parametrize("target", ["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float32_convert_through_disk_verifies(family, target, saved_family, tmp_path):
    out = tmp_path / "out"
    report = convert(str(saved_family(family)), out, to=target)
    assert report["status"] == "pass"
    assert report["metrics"]["max_abs_logprob"]["value"] <= TOL[torch.float32]
    assert report["metrics"]["top1_agreement"]["value"] == 1.0
    assert (out / "equivalence_report.json").is_file() and (out / "equivalence_report.md").is_file()
    if report["stock_loadable"]:
        assert report["stock_load"]["status"] == "pass"
