"""Fused MoE experts (a stacked [E, ...] weight applied by a matmul on routed rows, summed with routing
weights): the stack's down projection is the residual writer, centred along its output axis; the routing
weights scale whole rows, which keeps the stream linear. PhiMoE and DBRX convert exactly."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from model_zoo import randomise
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.transforms.apply import apply_rms_plan
from normsurgeon.transforms.plan import plan_rms_conversion

D = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
         intermediate_size=64, max_position_embeddings=64)


def phimoe(eager: bool):
    cfg = T.PhimoeConfig(**D, num_local_experts=4, num_experts_per_tok=2)
    if eager:  # per-expert F.linear + index_add_ (runs in float64); else grouped matmul (float32 only on CPU)
        cfg._experts_implementation = "eager"
    return randomise(T.PhimoeForCausalLM(cfg)).eval()


def dbrx(eager: bool):
    cfg = T.DbrxConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                       attn_config={"kv_n_heads": 4, "rope_theta": 10000.0, "clip_qkv": 8.0},
                       ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2})
    if eager:
        cfg._experts_implementation = "eager"
    return randomise(T.DbrxForCausalLM(cfg)).eval()


@pytest.mark.parametrize("build", [phimoe, dbrx])
def test_fused_experts_convert_exactly_in_float64(build):
    model = build(eager=True).double()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits.log_softmax(-1)
    nm = build_norm_map(model)
    experts = [w for w in nm.writers if w.kind.startswith("param:")]
    assert len(experts) == 2, nm.writers  # one stacked down projection per block
    plan = plan_rms_conversion(model, nm, "rmsnorm")
    work = copy.deepcopy(model)
    apply_rms_plan(work, plan)
    assert (work(ids).logits.log_softmax(-1) - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("build", [phimoe, dbrx])
def test_grouped_matmul_experts_map_the_same(build):
    """The grouped-matmul kernel has no float64 version: the map is traced in float32 and finds the same writers."""
    eager = {w.name: w.kind for w in build_norm_map(build(eager=True).double()).writers}
    grouped = {w.name: w.kind for w in build_norm_map(build(eager=False).double()).writers}
    assert eager == grouped


def test_fused_experts_cli_converts_and_streaming_says_why_not(tmp_path, capfd):
    """save_pretrained writes one tensor per expert, which transformers fuses when it loads: the in-memory
    path converts; the streaming path handles renamed tensors only and says so (exit 4)."""
    import json

    from faults import cli

    phimoe(eager=False).save_pretrained(tmp_path / "src")
    code, _, err = cli(capfd, "convert", tmp_path / "src", "-o", tmp_path / "m")
    assert code == 0, err
    report = json.loads((tmp_path / "m" / "equivalence_report.json").read_text())
    assert report["status"] == "pass" and report["stock_load"]["status"] == "pass"
    code, _, err = cli(capfd, "convert", tmp_path / "src", "-o", tmp_path / "s", "--stream")
    assert code == 4 and "convert in memory" in err
