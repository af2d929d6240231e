"""Norms found by behaviour, not trusted by type or missed for lack of parameters: Nemotron's LayerNorm1P (a LayerNorm
subclass with gain 1 + w) converts exactly, in memory and streaming, kept-gain and folded, stock-loadable."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from model_zoo import randomise
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.transforms.apply import apply_rms_plan
from normsurgeon.transforms.plan import plan_rms_conversion


def nemotron() -> torch.nn.Module:
    cfg = T.NemotronConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64, head_dim=8,
                           partial_rotary_factor=0.5)
    return randomise(T.NemotronForCausalLM(cfg)).eval()


def test_layernorm_subclass_with_offset_gain_is_recognised():
    nm = build_norm_map(nemotron())
    kinds = {n.kind.family: n.kind.gain_offset for n in nm.norms}
    assert kinds == {"layernorm": 1.0}


@pytest.mark.parametrize("policy", ["stock", "fold-all"])
def test_offset_layernorm_converts_exactly_in_float64(policy):
    model = nemotron().double()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits.log_softmax(-1)
    plan = plan_rms_conversion(model, build_norm_map(model), "rmsnorm", policy)
    assert plan.gain_offsets and (policy == "stock") == bool(plan.kept_gain)
    work = copy.deepcopy(model)
    apply_rms_plan(work, plan)
    assert (work(ids).logits.log_softmax(-1) - ref).abs().max().item() < 1e-10


def test_offset_layernorm_cli_in_memory_equals_streaming_and_loads_stock(tmp_path, capfd):
    from faults import cli

    nemotron().save_pretrained(tmp_path / "src")
    assert cli(capfd, "convert", tmp_path / "src", "-o", tmp_path / "mem", "--bias-policy", "fold-all")[0] == 0
    assert cli(capfd, "convert", tmp_path / "src", "-o", tmp_path / "str", "--bias-policy", "fold-all",
               "--stream")[0] == 0
    a, b = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "str" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = cli(capfd, "convert", tmp_path / "src", "-o", tmp_path / "stock")
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "stock" / "equivalence_report.json").read_text())
    assert report["stock_load"]["status"] == "pass" and report["metrics"]["max_abs_logprob"]["value"] < 1e-4


def olmo() -> torch.nn.Module:
    cfg = T.OlmoConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64, eos_token_id=0, pad_token_id=1)
    return randomise(T.OlmoForCausalLM(cfg)).eval()


def test_parameter_free_layernorm_modules_are_found_and_converted():
    """OLMo-1's OlmoLayerNorm has no parameters (so it is not a traced leaf): its layer_norm call is
    attributed to it. Its code computes the norm in float32 even in a float64 model, so the float64
    comparison is bounded by float32 round-off (~1e-7), not 1e-10."""
    model = olmo().double()
    nm = build_norm_map(model)
    assert nm.placement == "pre-ln" and not nm.other_norm_ops
    assert all(not n.kind.has_weight for n in nm.norms) and len(nm.by_role("pre")) == 4
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits.log_softmax(-1)
    work = copy.deepcopy(model)
    apply_rms_plan(work, plan_rms_conversion(model, nm, "rmsnorm"))
    assert (work(ids).logits.log_softmax(-1) - ref).abs().max().item() < 1e-5


def test_parameter_free_layernorm_cli_in_memory_and_streaming(tmp_path, capfd):
    import json

    from faults import cli

    olmo().save_pretrained(tmp_path / "src")
    for extra in ([], ["--stream"]):
        out = tmp_path / ("s" if extra else "m")
        code, _, err = cli(capfd, "convert", tmp_path / "src", "-o", out, *extra)
        assert code == 0, err
        report = json.loads((out / "equivalence_report.json").read_text())
        assert report["status"] == "pass" and report["stock_loadable"]
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "s" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
