"""Models whose code makes dtype-less tensors (XGLM's ``torch.full((), finfo(x.dtype).min)``) crash in a
plain float64 forward; the tracer and the verifier run them with float64 as torch's default dtype."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from model_zoo import randomise
from normsurgeon.errors import UnsupportedModel
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.transforms.plan import plan_rms_conversion
from normsurgeon.verification.runner import compare_models


def xglm():
    return randomise(T.XGLMForCausalLM(T.XGLMConfig(vocab_size=96, d_model=32, num_layers=2, attention_heads=4,
                                                     ffn_dim=64, max_position_embeddings=64))).eval()


def test_a_plain_float64_forward_of_xglm_crashes():  # the transformers bug this works around
    with pytest.raises(RuntimeError, match="overflow"):
        xglm().double()(torch.randint(0, 96, (1, 5)))


def test_xglm_traces_and_compares_in_float64():
    model = xglm().double()
    nm = build_norm_map(model)  # no crash
    with pytest.raises(UnsupportedModel):  # positions computed at run time from a buffer: refused, not exit 1
        plan_rms_conversion(model, nm, "rmsnorm")
    r = compare_models(model, copy.deepcopy(model), [{"input_ids": torch.randint(0, 96, (2, 6))}], torch.float64, [])
    assert r["metrics"]["max_abs_logprob"] == 0.0
    assert torch.get_default_dtype() == torch.float32


def test_a_stream_that_cannot_be_followed_is_refused_naming_the_term():
    from normsurgeon.transforms.refusals import MAX_CHARS

    model = xglm()
    with pytest.raises(UnsupportedModel) as e:
        plan_rms_conversion(model, build_norm_map(model), "rmsnorm")
    msg = str(e.value)
    assert "cannot be followed" in msg and "embed_positions" in msg and len(msg) <= MAX_CHARS + 80


def test_kernels_without_float64_are_traced_in_float32():
    """PhiMoE's grouped expert matmul has no float64 kernel: the map traces a float32 copy instead of
    crashing (the structure is the same), and the plan acts on the float64 model."""
    cfg = T.PhimoeConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64,
                         num_local_experts=4, num_experts_per_tok=2)
    model = randomise(T.PhimoeForCausalLM(cfg)).eval().double()
    nm = build_norm_map(model)
    assert nm.by_role("pre") and any(w.kind.startswith("param:") for w in nm.writers)
    plan = plan_rms_conversion(model, nm, "rmsnorm")  # tests/test_fused_experts.py checks it numerically
    assert any(kind.startswith("param:") for _, kind in plan.center)
