"""Issue 13 item 1: models already on RMSNorm (Llama, Qwen2, Mistral, Gemma's (1+w), Phi-3, Qwen3) are converted,
not refused: every pre/final norm's gain is folded into its readers, nothing is centred, the norms stay the stock
class with unit gain (Gemma: w = 0), the output loads in stock transformers, exact in float64 and float32."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T

from model_zoo import build_zoo, example_inputs, randomise
from normsurgeon.conversion import convert
from normsurgeon.errors import UnsupportedModel
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.rotation.exact_norms import exact_pair
from normsurgeon.transforms.apply import apply_rms_plan
from normsurgeon.transforms.plan import plan_rms_conversion

_LM = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=2, pad_token_id=1)
EXTRA = {
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_LM)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**_LM, head_dim=8)),  # QK RMSNorms stay (inner)
    "llama_tied": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_LM, tie_word_embeddings=True)),
}
RMS = ["llama", "mistral", "qwen2", "gemma", *EXTRA]


def _build(name: str) -> torch.nn.Module:
    if name in EXTRA:
        torch.manual_seed(0)
        return randomise(EXTRA[name]())
    return build_zoo(name)


def _logp(model, ids):
    with torch.no_grad():
        return model(ids).logits.double().log_softmax(-1)


def _ids(model):
    return example_inputs(model)["input_ids"]


@pytest.mark.parametrize("name", RMS)
def test_plan_folds_every_gain_and_centres_nothing(name):
    m = _build(name)
    nm = build_norm_map(m)
    plan = plan_rms_conversion(m, nm, "rmsnorm")
    assert plan.source_family == "rmsnorm" and plan.center == [] and plan.replace == {} and plan.bake == []
    pre_final = {n.name for n in nm.by_role("pre", "final")}
    assert {f.norm for f in plan.folds if f.fold_gain} == pre_final and not plan.kept_gain
    assert {f.gain_offset for f in plan.folds} == ({1.0} if name == "gemma" else {0.0})
    assert plan.writers and plan.stock_loadable
    assert plan.untie == ([("lm_head", "model.embed_tokens")] if m.config.tie_word_embeddings else [])
    inner = {n.name for n in nm.norms if n.role == "inner"}
    assert not inner & {f.norm for f in plan.folds}  # QK norms are never touched


@pytest.mark.parametrize("name", RMS)
def test_fold_is_exact_in_memory(name):
    src = _build(name).double()
    work = copy.deepcopy(src)
    plan = plan_rms_conversion(work, build_norm_map(work), "rmsnorm")
    apply_rms_plan(work, plan)
    offsets = {f.norm: f.gain_offset for f in plan.folds}
    for norm, off in offsets.items():
        mod = work.get_submodule(norm)
        assert type(mod) is type(src.get_submodule(norm))  # the stock class, kept
        assert bool(torch.all(mod.weight.detach() == 1.0 - off))  # unit gain (Gemma: w = 0)
    ids = _ids(src)
    a, b = copy.deepcopy(src), copy.deepcopy(work)
    exact_pair(a, b)  # GemmaRMSNorm computes in float32 whatever the dtype: compare past that round-off
    assert (_logp(a, ids) - _logp(b, ids)).abs().max().item() <= 1e-10
    assert (_logp(src.float(), ids) - _logp(work.float(), ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma", "phi3", "llama_tied"])
def test_convert_float32_is_verified_and_stock_loadable(name, tmp_path):
    src = _build(name)
    src.save_pretrained(tmp_path / "src")
    report = convert(str(tmp_path / "src"), tmp_path / "out", to="rmsnorm")
    assert report["status"] == "pass" and report["stock_loadable"]
    assert report["metrics"]["max_abs_logprob"]["value"] <= 1e-4
    assert report["stock_load"]["status"] == "pass"
    layers = src.config.num_hidden_layers
    assert report["plan"]["centred_writers"] == 0 and report["plan"]["folded_norms"] == 2 * layers + 1
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == src.config.model_type and cfg["normsurgeon"]["rmsnorm"] == {}
    stock = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(src)
    assert (_logp(src, ids) - _logp(stock, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral",
                                  pytest.param("gemma", marks=pytest.mark.xfail(strict=True, reason=(
                                      "GemmaRMSNorm computes in float32 whatever the model dtype: the stock "
                                      "verification sees 5.8e-08 > 1e-10 (test_fold_is_exact_in_memory checks "
                                      "the fold past that round-off)")))])
def test_convert_float64_is_exact(name, tmp_path):
    _build(name).double().save_pretrained(tmp_path / "src")
    report = convert(str(tmp_path / "src"), tmp_path / "out", to="rmsnorm")
    assert report["status"] == "pass" and report["metrics"]["max_abs_logprob"]["value"] <= 1e-10


def test_crmsnorm_is_refused_for_rmsnorm_models():
    m = build_zoo("llama")
    with pytest.raises(UnsupportedModel, match="zero-mean"):
        plan_rms_conversion(m, build_norm_map(m), "crmsnorm")


def test_output_norm_rms_models_are_still_refused():
    m = build_zoo("olmo2")
    with pytest.raises(UnsupportedModel, match="Peri-LN"):
        plan_rms_conversion(m, build_norm_map(m), "rmsnorm")


def test_layernorm_plans_are_unchanged():
    m = build_zoo("gpt2")
    plan = plan_rms_conversion(m, build_norm_map(m), "rmsnorm")
    assert plan.source_family == "layernorm" and plan.writers == plan.center and len(plan.center) == 6
    assert set(plan.replace) == {f.norm for f in plan.folds}
