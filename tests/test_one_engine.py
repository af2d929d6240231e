"""Issue 14: one conversion engine. The job executor (``normsurgeon/stream/``) gives the same tensors as the
module-level executor ``convert`` used before (``tests/reference_executor.py``) on every zoo family, both
targets; and a model in memory and its checkpoint on disk give byte-identical shards.

Bit-identity is the claim (``torch.equal``): both run the same float64 primitives in the same order.
"""
from __future__ import annotations

import copy

import pytest
import torch

import reference_executor as ref
from model_zoo import ZOO, build_zoo
from normsurgeon.errors import NormSurgeonError
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.stream.execute import run_to_state_dict
from normsurgeon.stream.plan import plan_in_memory
from normsurgeon.transforms.plan import plan_rms_conversion

CONVERTIBLE = sorted(ZOO)  # refusals are skipped (their refusal is tests/test_support_matrix.py's subject)


def _plan(model, target):
    try:
        return plan_rms_conversion(model, build_norm_map(model), target, "fold-all" if target == "crmsnorm" else "stock")
    except NormSurgeonError as e:  # refused (e.g. CRMSNorm on a family that cannot shrink): not this test's subject
        pytest.skip(f"refused: {e}")


@pytest.mark.parametrize("target", ["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize("family", CONVERTIBLE)
def test_engine_equals_the_module_executor(family, target):
    try:
        model = build_zoo(family).double()
    except RuntimeError as e:  # a model whose kernels have no float64 version
        pytest.skip(str(e))
    old = copy.deepcopy(model)
    plan = _plan(old, target)
    try:
        ref.apply_rms_plan(old, plan)
    except (ValueError, AttributeError, KeyError) as e:
        pytest.skip(f"the old executor could not run it either: {e}")
    want = old.state_dict()
    sp = plan_in_memory(model, target, plan.bias_policy, rms_plan=copy.deepcopy(plan))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = run_to_state_dict(sp, model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the source model was modified"
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:5]
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k].to(got[k].dtype))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


STREAMED_CRMS = ("gpt2", "opt", "bloom", "vit")


@pytest.mark.parametrize("target", ["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize("family", [n for n, e in ZOO.items() if e.convert == "exact"])
def test_in_memory_and_streamed_shards_are_byte_identical(family, target, tmp_path):
    """One engine, two sources: a model's state dict and its checkpoint's shards give the same bytes."""
    from normsurgeon.conversion import convert
    from normsurgeon.stream import stream_convert

    if target == "crmsnorm" and family not in STREAMED_CRMS:
        pytest.skip("CRMSNorm streamed on a few families only (CI time)")
    build_zoo(family).save_pretrained(tmp_path / "src")
    try:
        convert(str(tmp_path / "src"), tmp_path / "mem", to=target, run_verify=False)
    except NormSurgeonError as e:
        pytest.skip(f"refused in memory: {e}")
    try:
        stream_convert(tmp_path / "src", tmp_path / "streamed", to=target, verify="none")
    except NormSurgeonError as e:  # what streaming cannot plan from headers alone is refused, not wrong
        pytest.skip(f"refused streamed: {e}")
    shards = sorted(p.name for p in (tmp_path / "mem").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    different = [n for n in shards if (tmp_path / "mem" / n).read_bytes() != (tmp_path / "streamed" / n).read_bytes()]
    assert not different, different
