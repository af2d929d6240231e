"""Every scheme: build it, run it, check its stated property (conversion and from-scratch init)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from placement_helpers import L, block_outputs, gpt2, gptj, ids, llama, qwen3, token_rms
from normsurgeon.errors import UnsupportedModel, UsageError
from normsurgeon.placement.apply import place
from normsurgeon.placement.evaluate import compare
from normsurgeon.placement.spec import build_spec, parse_block_spec


def convert(factory, scheme, calibrate=True, **opts):
    src = factory()
    m = copy.deepcopy(src)
    r = place(m, build_spec(scheme, L, opts), calib_ids=ids(8, 16, 1), calibrate_gains=calibrate)
    return src, m, r, compare(src, m, ids())


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_lns_is_exact_to_float64_roundoff(factory):
    src, m, r, ev = convert(factory, "lns")
    assert r.preservation["level"] == "exact"
    assert ev["max_abs_logit_diff"] < 1e-12 and abs(ev["delta_loss"]) < 1e-12
    blocks = m.model.layers if factory is llama else m.transformer.h
    sblocks = src.model.layers if factory is llama else src.transformer.h
    name = "input_layernorm" if factory is llama else "ln_1"
    for i in range(L):  # sqrt(l) folded into the gain; the block applies 1/sqrt(l)
        assert blocks[i].ns_spec.attn.scale == pytest.approx(1 / math.sqrt(i + 1))
        torch.testing.assert_close(getattr(blocks[i], name).weight, getattr(sblocks[i], name).weight * math.sqrt(i + 1))


def test_lns_from_scratch_scales_unit_gains():
    m = llama()
    place(m, build_spec("lns", L), mode="fresh")
    assert all(b.input_layernorm.weight.eq(1).all() is not None for b in m.model.layers)
    assert m.model.layers[3].ns_spec.mlp.scale == 0.5


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_pre_is_identity(factory):
    _, _, r, ev = convert(factory, "pre")
    assert r.preservation["level"] == "exact" and ev["max_abs_logit_diff"] == 0.0


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_peri_calibrated_gains_beat_unit_gains(factory):
    _, m, r, ev = convert(factory, "peri")
    _, _, _, ev1 = convert(factory, "peri", calibrate=False)
    assert r.preservation["level"] == "approximate after calibration"
    assert abs(ev["delta_loss"]) < abs(ev1["delta_loss"])
    blk = (m.model.layers if factory is llama else m.transformer.h)[0]
    assert blk.post_norm1.weight.std() == 0 and blk.post_norm1.weight[0] != 1  # one calibrated scalar


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_post_blocks_emit_normalised_stream(factory):
    m = factory()
    place(m, build_spec("post", L), mode="fresh")  # unit gains, zero shifts
    for out in block_outputs(m, m.model.layers if factory is llama else m.transformer.h, ids()):
        rms = token_rms(out if factory is llama else out - out.mean(-1, keepdim=True))
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


def test_post_conversion_reports_change_and_moves_norm_to_embeddings():
    _, m, r, ev = convert(llama, "post")
    assert r.preservation["level"] == "not function-preserving" and ev["delta_loss"] != 0
    assert isinstance(m.model.layers[0].input_layernorm, torch.nn.Identity)
    assert hasattr(m.model, "embed_norm") and r.notes


def test_mix_puts_round_alpha_L_post_blocks_first():
    m = llama(layers=8)
    place(m, build_spec("mix", 8, {"alpha": 0.25}), mode="fresh")
    labels = [b.ns_spec.label for b in m.model.layers]
    assert labels == ["post"] * 2 + ["pre"] * 6
    outs = block_outputs(m, m.model.layers, ids())
    assert (token_rms(outs[1]) - 1).abs().max() < 1e-5  # Post-LN block: its output is a norm's output
    assert (token_rms(outs[5]) - 1).abs().max() > 1e-4  # Pre-LN block: the stream keeps growing


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_deepnorm_alpha_and_beta(factory):
    ref, m = factory(), factory()
    r = place(m, build_spec("deepnorm", L), mode="fresh")
    beta = (8 * L) ** -0.25
    blk, rblk = (m.model.layers[1], ref.model.layers[1]) if factory is llama else (m.transformer.h[1], ref.transformer.h[1])
    assert blk.ns_spec.attn.residual_alpha == pytest.approx((2 * L) ** 0.25)
    if factory is llama:
        for name in ("self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.up_proj"):
            torch.testing.assert_close(blk.get_submodule(name).weight, rblk.get_submodule(name).weight * beta)
        torch.testing.assert_close(blk.self_attn.q_proj.weight, rblk.self_attn.q_proj.weight)
    else:
        torch.testing.assert_close(blk.attn.c_attn.weight[:, 64:], rblk.attn.c_attn.weight[:, 64:] * beta)
        torch.testing.assert_close(blk.attn.c_attn.weight[:, :64], rblk.attn.c_attn.weight[:, :64])
    assert torch.isfinite(m(input_ids=ids()).logits).all() and r.notes


def test_deepnorm_conversion_reports_loss_change():
    _, _, r, ev = convert(llama, "deepnorm")
    assert r.preservation["level"] == "not function-preserving" and math.isfinite(ev["delta_loss"])


@pytest.mark.parametrize("star", [False, True])
def test_hybridnorm_normalises_q_k_v_per_head(star):
    m = llama()
    place(m, build_spec("hybridnorm", L, {"star": star}), mode="fresh")
    b0, b1 = m.model.layers[0], m.model.layers[1]
    assert isinstance(b1.input_layernorm, torch.nn.Identity) and b1.ns_spec.mlp.residual_from_normed
    assert isinstance(b0.input_layernorm, torch.nn.Identity) != star
    got = []
    h = b1.self_attn.v_proj.register_forward_hook(lambda mod, a, o: got.append(o))
    m(input_ids=ids())
    h.remove()
    v = got[0].view(4, 16, -1, 8)  # per head, unit gains: RMS 1
    assert torch.allclose(token_rms(v), torch.ones_like(token_rms(v)), atol=1e-3)


def test_qk_norm_on_llama_calibrated_and_off_on_qwen3():
    _, m, r, ev = convert(llama, "qk-norm")
    assert r.preservation["level"] == "not function-preserving" and math.isfinite(ev["delta_loss"])
    assert m.model.layers[0].self_attn.q_norm.weight.std() == 0 and m.model.layers[0].self_attn.q_norm.weight[0] != 1
    src = qwen3()
    off = copy.deepcopy(src)
    place(off, build_spec("pre", 2, {"qk": "none"}), calib_ids=ids())
    assert isinstance(off.model.layers[0].self_attn.q_norm, torch.nn.Identity)
    assert compare(src, off, ids())["max_abs_logit_diff"] > 0


def test_qk_norm_on_fused_qkv_and_refusals():
    # GPT-2's c_attn fuses q, k, v: the anatomy maps its channels to heads, so QK-norm applies at them
    _, m, r, ev = convert(gpt2, "qk-norm")
    attn = m.transformer.h[0].attn
    assert attn.q_norm.weight.shape == (8,) and attn.q_norm.weight[0] != 1 and math.isfinite(ev["delta_loss"])
    q3 = qwen3()  # Qwen3 has q/k norms: HybridNorm keeps them and adds the v norm
    native = q3.model.layers[0].self_attn.q_norm
    place(q3, build_spec("hybridnorm", 2), mode="fresh")
    assert q3.model.layers[0].self_attn.q_norm is native and q3.model.layers[0].self_attn.v_norm.weight.shape == (8,)
    src = qwen3()
    r = place(src, build_spec("qk-norm", 2), calib_ids=ids())  # already there: kept as they are (exact)
    assert not hasattr(src.model.layers[0].self_attn, "v_norm") and r.preservation["level"] == "exact"
    with pytest.raises(UnsupportedModel, match="parallel block"):  # HybridNorm's FFN residual needs a sequential block
        place(gptj(), build_spec("hybridnorm", 2), mode="fresh")


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_dyt_alpha_is_inverse_input_rms(factory):
    src, m, r, ev = convert(factory, "dyt")
    from normsurgeon.lnfree.dyt import DyT

    norms = [mod for mod in m.modules() if isinstance(mod, DyT)]
    assert len(norms) == 2 * L + 1 and r.preservation["level"] == "approximate after calibration"
    assert len({round(float(n.alpha), 6) for n in norms}) > 1 and math.isfinite(ev["delta_loss"])


def test_output_only_removes_input_norms():
    _, m, r, ev = convert(llama, "output-only")
    assert isinstance(m.model.layers[2].post_attention_layernorm, torch.nn.Identity)
    assert r.preservation["level"] == "not function-preserving" and math.isfinite(ev["delta_loss"])


def test_block_spec_composes_and_rejects_nonsense():
    spec = parse_block_spec("post@0:1,peri+qk@1:3,pre+lns@3:", L)
    assert [b.label for b in spec.blocks] == ["post", "peri+qk", "peri+qk", "pre+lns"]
    m = llama()
    place(m, spec, calib_ids=ids())
    assert torch.isfinite(m(input_ids=ids()).logits).all()
    for bad in ("sideways@0:1", "pre@3:9", "post+lns"):
        with pytest.raises(UsageError):
            parse_block_spec(bad, L)


def test_placing_twice_is_refused():
    m = llama()
    place(m, build_spec("lns", L), calib_ids=ids())
    with pytest.raises(UnsupportedModel, match="already placed"):
        place(m, build_spec("lns", L), calib_ids=ids())
