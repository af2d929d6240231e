"""Both ways of loading a converted folder: stock transformers (no normsurgeon) and normsurgeon.load."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from model_zoo import build, model_inputs
from normsurgeon.conversion import convert
from normsurgeon.io.loader import load_model
from normsurgeon.modules import CRMSNorm, RMSNorm


def _max_logprob_diff(a, b, inputs):
    with torch.no_grad():
        la = a(**inputs).logits.double().log_softmax(-1)
        lb = b(**inputs).logits.double().log_softmax(-1)
    return (la - lb).abs().max().item()


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "phi"])
def test_stock_transformers_loads_rmsnorm_output_equivalently(family, saved_family, tmp_path):
    src_dir = saved_family(family)
    out = tmp_path / "rms"
    convert(str(src_dir), out, to="rmsnorm")
    src = transformers.AutoModelForCausalLM.from_pretrained(src_dir).eval()
    stock = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code, no normsurgeon
    assert type(stock) is type(src)
    assert _max_logprob_diff(src, stock, model_inputs(src)) <= 1e-4
    ours = load_model(str(out)).model
    replaced = [n for n, m in ours.named_modules() if isinstance(m, RMSNorm)]
    assert set(replaced) == set(json.loads((out / "config.json").read_text())["normsurgeon"]["rmsnorm"])
    assert not any(isinstance(m, torch.nn.LayerNorm) for n, m in ours.named_modules() if n in replaced)
    assert _max_logprob_diff(src, ours, model_inputs(src)) <= 1e-4


def test_untied_head_is_written_and_flagged(saved_family, tmp_path):
    out = tmp_path / "rms"
    report = convert(str(saved_family("gpt2")), out, to="rmsnorm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert report["plan"]["untied"] == ["lm_head"]
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"lm_head.weight", "transformer.wte.weight"} <= keys
        assert not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("transformer.wte.weight"))


@pytest.mark.parametrize("family,target", [("bloom", "rmsnorm"), ("gpt2", "crmsnorm"), ("vit", "crmsnorm")])
def test_custom_structure_is_refused_by_stock_and_loads_through_normsurgeon(family, target, saved_family, tmp_path):
    out = tmp_path / "conv"
    report = convert(str(saved_family(family)), out, to=target)
    assert report["stock_loadable"] is False
    auto = transformers.AutoModelForImageClassification if family == "vit" else transformers.AutoModelForCausalLM
    with pytest.raises(Exception):  # a loud refusal, never a silently different model
        auto.from_pretrained(out)
    model = load_model(str(out)).model
    if target == "crmsnorm":
        assert any(isinstance(m, CRMSNorm) for m in model.modules())
        cfg = json.loads((out / "config.json").read_text())
        width = cfg.get("hidden_size", cfg.get("n_embd"))
        if family != "vit":
            assert model.get_input_embeddings().weight.shape[-1] == width - 1
    src = build(family).eval()
    inputs = model_inputs(src)
    with torch.no_grad():
        a = src(**inputs).logits.double().log_softmax(-1)
        b = model(**inputs).logits.double().log_softmax(-1)
    assert (a - b).abs().max().item() <= 1e-4


def test_fold_all_policy_creates_biases_and_is_custom(saved_family, tmp_path):
    out = tmp_path / "all"
    report = convert(str(saved_family("gpt2")), out, to="rmsnorm", bias_policy="fold-all")
    assert report["status"] == "pass"
    assert report["plan"]["created_bias"] == ["lm_head"]
    assert report["plan"]["kept_on_norm"] == {}
    model = load_model(str(out)).model
    assert model.lm_head.bias is not None
    ln_f = model.transformer.ln_f
    assert torch.all(ln_f.weight == 1) and torch.all(ln_f.bias == 0)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("bfloat16", 1.5e-1), ("float16", 3e-2)])
def test_output_dtypes_verify_against_their_thresholds(dtype, tol, saved_family, tmp_path):
    out = tmp_path / dtype
    report = convert(str(saved_family("gpt2")), out, to="rmsnorm", dtype=dtype)
    assert report["output"]["dtype"] == dtype
    assert report["metrics"]["max_abs_logprob"]["threshold"] == tol
    assert report["status"] == "pass"


def test_float64_source_converts_to_1e10(saved_family, tmp_path):
    out = tmp_path / "f64"
    report = convert(str(saved_family("opt", torch.float64)), out, to="rmsnorm")
    assert report["output"]["dtype"] == "float64"
    assert report["metrics"]["max_abs_logprob"]["value"] <= 1e-10


def test_sharded_output_has_index_and_loads(saved_family, tmp_path):
    out = tmp_path / "sharded"
    report = convert(str(saved_family("gpt_neox")), out, to="rmsnorm", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert report["status"] == "pass"


def test_input_folder_is_not_modified(saved_family, tmp_path):
    src = saved_family("gpt2")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    convert(str(src), tmp_path / "o", to="crmsnorm")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
