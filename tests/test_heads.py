"""Heads that used to break the map: a bias added after the head (ESM's ``decoder(x) + bias``, BART's
``final_logits_bias``) is not a residual writer, and a decoder tied to the input embedding behind an
MLM head transform is untied before the embedding is centred. Randomised weights and norms, float64."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from model_zoo import randomise
from normsurgeon.graph.normmap import build_norm_map
from normsurgeon.io.example_inputs import example_inputs
from normsurgeon.transforms.apply import apply_rms_plan
from normsurgeon.transforms.plan import plan_rms_conversion

ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
MODELS = {
    "esm": lambda: T.EsmForMaskedLM(T.EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, token_dropout=False,
                                                emb_layer_norm_before=False, position_embedding_type="absolute",
                                                **ENC)),
    "xlm-roberta-xl": lambda: T.XLMRobertaXLForMaskedLM(T.XLMRobertaXLConfig(vocab_size=96, **ENC)),
    "megatron-bert": lambda: T.MegatronBertForMaskedLM(T.MegatronBertConfig(vocab_size=96, **ENC)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pre_ln_encoders_with_tied_mlm_heads_convert_exactly(name):
    model = randomise(MODELS[name]()).eval().double()
    vocab = model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():  # non-zero biases after the head, which must not count as residual writers
        for _, p in model.named_parameters():
            if p.dim() == 1 and p.numel() == vocab:
                p.normal_()
    ex = {k: v for k, v in example_inputs(model, seq_len=10, batch=2).items() if k != "use_cache"}
    ref = model(**ex).logits.log_softmax(-1)
    nm = build_norm_map(model)
    assert not nm.stream_problems and all(w.kind not in ("param", "buffer") or "bias" not in w.name for w in nm.writers)
    plan = plan_rms_conversion(model, nm, "rmsnorm")
    decoder = [n for n, m in model.named_modules() if m is model.get_output_embeddings()][0]
    assert decoder in {r for r, _ in plan.untie}  # tied to the centred word embeddings
    work = copy.deepcopy(model)
    apply_rms_plan(work, plan)
    assert (work(**ex).logits.log_softmax(-1) - ref).abs().max().item() < 1e-10


def _mbart():
    cfg = T.MBartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return randomise(T.MBartForConditionalGeneration(cfg)).eval()


def test_mbart_embedding_norm_over_two_tables_centres_its_output_and_converts_exactly():
    """mBART normalizes tokens + positions before the first block: it cannot be baked into one table, so it
    becomes a CentredLayerNorm; every other norm converts as usual. Encoder and decoder are two streams;
    the decoder's cross-attention k/v projections read the encoder's final norm."""
    from normsurgeon.modules import CentredLayerNorm

    model = _mbart().double()
    ex = {k: v for k, v in example_inputs(model, seq_len=10, batch=2).items() if k != "use_cache"}
    ref = model(**ex).logits.log_softmax(-1)
    nm = build_norm_map(model)
    assert {n.name for n in nm.by_role("embedding")} == {"model.encoder.layernorm_embedding",
                                                          "model.decoder.layernorm_embedding"}
    enc_final = nm.norm("model.encoder.layer_norm")
    assert any("encoder_attn.k_proj" in r.name for r in enc_final.readers)
    plan = plan_rms_conversion(model, nm, "rmsnorm")
    assert len(plan.recentre) == 2 and not plan.stock_loadable
    work = copy.deepcopy(model)
    apply_rms_plan(work, plan)
    assert isinstance(work.model.encoder.layernorm_embedding, CentredLayerNorm)
    assert (work(**ex).logits.log_softmax(-1) - ref).abs().max().item() < 1e-10


def test_mbart_cli_converts_and_reloads(tmp_path, capfd):
    import json

    from faults import cli

    _mbart().save_pretrained(tmp_path / "src")
    code, _, err = cli(capfd, "convert", tmp_path / "src", "-o", tmp_path / "out")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "equivalence_report.json").read_text())
    assert report["status"] == "pass" and report["metrics"]["max_abs_logprob"]["value"] < 1e-4
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "normsurgeon_mbart" and cfg["normsurgeon"]["centred"]
