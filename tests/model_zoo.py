"""Tiny random models of every supported family, with randomised norm parameters and biases.

Default-initialised norms (gain 1, shift 0) and zero biases hide a converter that folds nothing, so
every factory here perturbs them (planning digest, pitfall 6).
"""
from __future__ import annotations

import torch
import transformers as T

D, L, H, V = 32, 2, 4, 96


def _lm(cfg_cls, model_cls, **kw):
    return lambda: model_cls(cfg_cls(**kw))


FAMILIES = {
    "gpt2": _lm(T.GPT2Config, T.GPT2LMHeadModel, vocab_size=V, n_positions=64, n_embd=D, n_layer=L, n_head=H,
                bos_token_id=0, eos_token_id=0),
    "gpt_neo": _lm(T.GPTNeoConfig, T.GPTNeoForCausalLM, vocab_size=V, max_position_embeddings=64, hidden_size=D,
                   num_layers=L, num_heads=H, attention_types=[[["global", "local"], 1]], window_size=8,
                   bos_token_id=0, eos_token_id=0),
    "gptj": _lm(T.GPTJConfig, T.GPTJForCausalLM, vocab_size=V, n_positions=64, n_embd=D, n_layer=L, n_head=H,
                rotary_dim=4, bos_token_id=0, eos_token_id=0),
    "gpt_neox": _lm(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, vocab_size=V, max_position_embeddings=64, hidden_size=D,
                    num_hidden_layers=L, num_attention_heads=H, intermediate_size=64, bos_token_id=0, eos_token_id=0),
    "gpt_bigcode": _lm(T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, vocab_size=V, n_positions=64, n_embd=D,
                       n_layer=L, n_head=H, bos_token_id=0, eos_token_id=0),
    "opt": _lm(T.OPTConfig, T.OPTForCausalLM, vocab_size=V, max_position_embeddings=64, hidden_size=D,
               num_hidden_layers=L, num_attention_heads=H, ffn_dim=64, word_embed_proj_dim=D,
               bos_token_id=0, eos_token_id=0, pad_token_id=1),
    "bloom": _lm(T.BloomConfig, T.BloomForCausalLM, vocab_size=V, hidden_size=D, n_layer=L, n_head=H,
                 bos_token_id=0, eos_token_id=0),
    "falcon": _lm(T.FalconConfig, T.FalconForCausalLM, vocab_size=V, hidden_size=D, num_hidden_layers=L,
                  num_attention_heads=H, bias=True, bos_token_id=0, eos_token_id=0),
    "phi": _lm(T.PhiConfig, T.PhiForCausalLM, vocab_size=V, hidden_size=D, num_hidden_layers=L,
               num_attention_heads=H, intermediate_size=64, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0),
    "vit": _lm(T.ViTConfig, T.ViTForImageClassification, image_size=16, patch_size=4, hidden_size=D,
               num_hidden_layers=L, num_attention_heads=H, intermediate_size=64, num_labels=7),
}

# Structures that must be refused, each with the phrase the refusal must contain.
REFUSED = {
    "opt_post_ln": (_lm(T.OPTConfig, T.OPTForCausalLM, vocab_size=V, max_position_embeddings=64, hidden_size=D,
                        num_hidden_layers=L, num_attention_heads=H, ffn_dim=64, do_layer_norm_before=False,
                        bos_token_id=0, eos_token_id=0, pad_token_id=1), "Post-LN"),
    "bloom_post_residual": (_lm(T.BloomConfig, T.BloomForCausalLM, vocab_size=V, hidden_size=D, n_layer=L,
                                n_head=H, apply_residual_connection_post_layernorm=True,
                                bos_token_id=0, eos_token_id=0), "residual stream"),
    "bert": (_lm(T.BertConfig, T.BertForMaskedLM, vocab_size=V, hidden_size=D, num_hidden_layers=L,
                 num_attention_heads=H, intermediate_size=64, max_position_embeddings=64), "Post-LN"),
    "llama": (_lm(T.LlamaConfig, T.LlamaForCausalLM, vocab_size=V, hidden_size=D, num_hidden_layers=L,
                  num_attention_heads=H, intermediate_size=64, bos_token_id=0, eos_token_id=0), "already uses RMSNorm"),
    "gemma": (_lm(T.GemmaConfig, T.GemmaForCausalLM, vocab_size=V, hidden_size=D, num_hidden_layers=L,
                  num_attention_heads=H, num_key_value_heads=H, head_dim=8, intermediate_size=64,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1), "offset"),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: norm gains 1+0.5N, norm shifts 0.5N, other biases 0.1N, tables +0.3."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
                is_norm = "norm" in type(mod).__name__.lower()
                if is_norm and pname == "weight":
                    p.copy_(1.0 + 0.5 * noise)
                elif is_norm and pname == "bias":
                    p.copy_(0.5 * noise)
                elif pname == "bias":
                    p.copy_(0.1 * noise)
                elif isinstance(mod, torch.nn.Embedding) or p.dim() >= 3 and "token" in pname \
                        or "position_embeddings" in pname or "cls_token" in pname:
                    p.add_(0.3 + 0.02 * noise)
    return model.eval()


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A FAMILIES / REFUSED model (``randomise`` only, as always), else a ZOO entry (``build_zoo``)."""
    if family not in FAMILIES and family not in REFUSED:
        return build_zoo(family, seed)
    factory = FAMILIES[family] if family in FAMILIES else REFUSED[family][0]
    torch.manual_seed(seed)
    return randomise(factory(), seed)


def model_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 12, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        c = model.config
        return {"pixel_values": torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=gen)}
    return {"input_ids": torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)}


# ---------------------------------------------------------------------------------------------------------------
# The zoo of issue 10: tiny random Hugging Face architectures of every modality, as a data table.
#
# Each entry is built from its config (hidden 32, 2 layers, vocabulary 96, images 16-32 px, short audio) with
# randomised weights, norm gains/shifts, biases, BatchNorm running statistics and layer scales
# (``build_zoo``). ``recipes`` lists the CLI recipes that apply in principle; ``convert`` says what issue 10
# expects of ``convert --to rmsnorm``: "exact" (the structure allows an exact conversion), "refuse" (it does
# not: Post-LN, already RMSNorm, no LayerNorm at all) or "either" (unclear; any documented outcome).
# ``named``: issue 10 names the architecture as one that must convert exactly. ``benchmarks/support_matrix.py``
# runs every entry x recipe through the real CLI and writes docs/support.md.
#
# Left out (cannot be built in transformers 5.x at tiny sizes or not at all): listed in ``LEFT_OUT``.
# ---------------------------------------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

I = 64  # intermediate width
KINDS = ("decoder", "encoder-decoder", "encoder", "vision", "video", "audio", "cnn")
RECIPES = ("inspect", "convert", "convert-f64", "place", "remove-ln", "prepbn", "diagnose", "fold-bn")
_BY_KIND = {
    "decoder": ("inspect", "convert", "convert-f64", "place", "remove-ln", "prepbn", "diagnose"),
    "encoder-decoder": ("inspect", "convert", "convert-f64"),
    "encoder": ("inspect", "convert", "convert-f64"),
    "vision": ("inspect", "convert", "convert-f64", "prepbn"),
    "video": ("inspect", "convert", "convert-f64"),
    "audio": ("inspect", "convert", "convert-f64", "fold-bn"),
    "cnn": ("inspect", "convert", "fold-bn"),
}
_MODALITY = {"decoder": "text", "encoder-decoder": "text", "encoder": "text", "vision": "image",
             "video": "video", "audio": "audio", "cnn": "image"}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[[], torch.nn.Module] = field(repr=False)
    kind: str
    convert: str = "exact"  # what issue 10 expects of convert: exact / refuse / either
    named: bool = False  # issue 10 names it among the architectures that must convert exactly
    note: str = ""  # the structure in a few words (why exact / why refused)
    recipes: tuple[str, ...] = ()

    @property
    def modality(self) -> str:
        return _MODALITY[self.kind]

    def applies(self, recipe: str) -> bool:
        return recipe in self.recipes


def _e(name, factory, kind, convert="exact", named=False, note="", recipes=None):
    assert kind in KINDS and convert in ("exact", "refuse", "either"), (name, kind, convert)
    return ZooEntry(name, factory, kind, convert, named, note, tuple(recipes or _BY_KIND[kind]))


def _m(cfg_cls, model_cls, **kw):
    """Factory of model_cls(cfg_cls(**kw)); a callable model_cls is called with the config."""
    return lambda: model_cls(cfg_cls(**kw))


_TOK = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
_LM = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=I,
           max_position_embeddings=64, **_TOK)
_LMKV = dict(_LM, num_key_value_heads=H)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
# DBRX in transformers 5.24: the attention reads attn_config.rope_theta, which the config class does not define,
# and clamps with clip_qkv, which crashes when None (its default): give both.
_DBRX_ATTN = {"kv_n_heads": H, "rope_theta": 1e4, "clip_qkv": 8.0}
_DBRX_FFN = {"ffn_hidden_size": I, "moe_num_experts": 4, "moe_top_k": 2}
_BART = dict(vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=L, encoder_attention_heads=H,
             decoder_attention_heads=H, encoder_ffn_dim=I, decoder_ffn_dim=I, max_position_embeddings=64,
             decoder_start_token_id=2, **_TOK)
_ENC = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=I,
            max_position_embeddings=64)
_VIT = dict(image_size=16, patch_size=4, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
            intermediate_size=I, num_labels=5)
_W2V = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=I,
            conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4, mask_time_prob=0.0, pad_token_id=1)


def _siglip_cls():
    vision = dict(hidden_size=D, intermediate_size=I, num_hidden_layers=L, num_attention_heads=H, image_size=16,
                  patch_size=4)
    text = dict(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=1, num_attention_heads=H,
                max_position_embeddings=16, **_TOK)
    return T.SiglipForImageClassification(T.SiglipConfig(vision_config=vision, text_config=text, num_labels=5))


def _dpt_hybrid():
    bit = T.BitConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1],
                      num_groups=4, layer_type="bottleneck", global_padding="same",
                      out_features=["stage1", "stage2", "stage3"])
    return T.DPTForDepthEstimation(T.DPTConfig(
        is_hybrid=True, backbone_config=bit, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
        intermediate_size=I, image_size=32, patch_size=16, backbone_out_indices=[0, 1],
        neck_hidden_sizes=[8, 16], reassemble_factors=[1, 1], fusion_hidden_size=16,
        backbone_featmap_shape=[1, 32, 2, 2], head_in_index=-1,
        use_batch_norm_in_fusion_residual=True))


_CNN = dict(num_channels=3, num_labels=5)

_ZOO = [
    # --- decoder LMs: Pre-LN LayerNorm families (convert must be exact) ---
    _e("gpt2", FAMILIES["gpt2"], "decoder", note="Pre-LN, learned positions, tied head"),
    _e("gpt_neo", FAMILIES["gpt_neo"], "decoder", note="Pre-LN, local/global attention"),
    _e("gptj", FAMILIES["gptj"], "decoder", note="parallel block, one shared LN"),
    _e("gpt_neox", FAMILIES["gpt_neox"], "decoder", note="parallel residual, two LNs"),
    _e("gpt_neox_sequential", _m(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, **_LM, use_parallel_residual=False),
       "decoder", note="GPT-NeoX with use_parallel_residual=False"),
    _e("gpt_bigcode", FAMILIES["gpt_bigcode"], "decoder", note="Pre-LN, multi-query attention"),
    _e("opt", FAMILIES["opt"], "decoder", note="Pre-LN, position offset 2"),
    _e("bloom", FAMILIES["bloom"], "decoder", note="embedding LayerNorm (baked into the table), ALiBi"),
    _e("falcon", FAMILIES["falcon"], "decoder", note="parallel block"),
    _e("phi", FAMILIES["phi"], "decoder", note="parallel block, one shared LN"),
    _e("codegen", _m(T.CodeGenConfig, T.CodeGenForCausalLM, vocab_size=V, n_positions=64, n_ctx=64, n_embd=D,
                     n_layer=L, n_head=H, rotary_dim=4, **_TOK), "decoder", note="parallel block (GPT-J style)"),
    _e("xglm", _m(T.XGLMConfig, T.XGLMForCausalLM, vocab_size=V, max_position_embeddings=64, d_model=D, ffn_dim=I,
                  num_layers=L, attention_heads=H, **_TOK), "decoder",
       note="Pre-LN, fixed sinusoidal positions (offset 2), scaled embeddings"),
    _e("mpt", _m(T.MptConfig, T.MptForCausalLM, d_model=D, n_heads=H, n_layers=L, expansion_ratio=2, max_seq_len=64,
                 vocab_size=V), "decoder", note="Pre-LN without biases, ALiBi"),
    _e("biogpt", _m(T.BioGptConfig, T.BioGptForCausalLM, **_LM), "decoder",
       note="Pre-LN, scaled embeddings, position offset 2"),
    _e("stablelm", _m(T.StableLmConfig, T.StableLmForCausalLM, **_LMKV), "decoder", note="Pre-LN, partial rotary"),
    _e("persimmon", _m(T.PersimmonConfig, T.PersimmonForCausalLM, **_LM), "decoder",
       note="Pre-LN with QK LayerNorms (inner norms stay)"),
    _e("starcoder2", _m(T.Starcoder2Config, T.Starcoder2ForCausalLM, **_LMKV), "decoder", note="Pre-LN with biases"),
    _e("olmo", _m(T.OlmoConfig, T.OlmoForCausalLM, **_LMKV), "decoder", named=True,
       note="OLMo-1: parameter-free LayerNorm"),
    _e("nemotron", _m(T.NemotronConfig, T.NemotronForCausalLM, **_LMKV, head_dim=8), "decoder", named=True,
       note="LayerNorm1P: gain 1+w"),
    _e("cohere", _m(T.CohereConfig, T.CohereForCausalLM, **_LMKV), "decoder", named=True,
       note="parallel block, LayerNorm without bias (own class), logit scale"),
    _e("dbrx", _m(T.DbrxConfig, T.DbrxForCausalLM, d_model=D, n_heads=H, n_layers=L, max_seq_len=64, vocab_size=V,
                  attn_config=_DBRX_ATTN, ffn_config=_DBRX_FFN, **_TOK),
       "decoder", named=True, note="MoE with fused expert weights, LayerNorm without bias"),
    _e("phimoe", _m(T.PhimoeConfig, T.PhimoeForCausalLM, **_LMKV, **_MOE), "decoder", note="MoE, LayerNorm"),
    _e("ctrl", _m(T.CTRLConfig, T.CTRLLMHeadModel, vocab_size=V, n_positions=64, n_embd=D, dff=I, n_layer=L,
                  n_head=H), "decoder", convert="either", note="Pre-LN, sinusoidal positions computed in the model"),
    # --- decoder LMs that cannot be converted: Post-LN, already RMSNorm ---
    _e("openai_gpt", _m(T.OpenAIGPTConfig, T.OpenAIGPTLMHeadModel, vocab_size=V, n_positions=64, n_embd=D,
                        n_layer=L, n_head=H), "decoder", convert="refuse", note="Post-LN"),
    _e("opt_post_ln", REFUSED["opt_post_ln"][0], "decoder", convert="refuse", note="OPT-350m style Post-LN"),
    _e("bloom_post_residual", REFUSED["bloom_post_residual"][0], "decoder", convert="refuse",
       note="residual taken after the LayerNorm"),
    _e("llama", REFUSED["llama"][0], "decoder", convert="exact", note="already RMSNorm"),
    _e("mistral", _m(T.MistralConfig, T.MistralForCausalLM, **_LMKV), "decoder", convert="exact",
       note="already RMSNorm"),
    _e("qwen2", _m(T.Qwen2Config, T.Qwen2ForCausalLM, **_LMKV), "decoder", convert="exact",
       note="already RMSNorm"),
    _e("mixtral", _m(T.MixtralConfig, T.MixtralForCausalLM, **_LMKV, **_MOE), "decoder", convert="exact",
       note="MoE, already RMSNorm"),
    _e("qwen2_moe", _m(T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, **_LMKV, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=32), "decoder",
       convert="exact", note="MoE with a shared expert, already RMSNorm"),
    _e("olmoe", _m(T.OlmoeConfig, T.OlmoeForCausalLM, **_LMKV, num_experts=4, num_experts_per_tok=2), "decoder",
       convert="exact", note="MoE, RMSNorm + QK-norm"),
    _e("gemma", REFUSED["gemma"][0], "decoder", convert="exact", note="RMSNorm with gain 1+w"),
    _e("olmo2", _m(T.Olmo2Config, T.Olmo2ForCausalLM, **_LMKV), "decoder", convert="refuse",
       note="output-norm placement, RMSNorm"),
    # --- encoder-decoders ---
    _e("whisper", _m(T.WhisperConfig, T.WhisperForConditionalGeneration, vocab_size=V, num_mel_bins=8,
                     encoder_layers=L, decoder_layers=L, encoder_attention_heads=H, decoder_attention_heads=H,
                     encoder_ffn_dim=I, decoder_ffn_dim=I, d_model=D, max_source_positions=16,
                     max_target_positions=32, decoder_start_token_id=2, begin_suppress_tokens=None, **_TOK),
       "encoder-decoder", named=True, note="Pre-LN; encoder stream starts at GELU(conv) + positions"),
    _e("mbart", _m(T.MBartConfig, T.MBartForConditionalGeneration, **_BART), "encoder-decoder", named=True,
       note="Pre-LN with embedding LayerNorms after the positions"),
    _e("pegasus", _m(T.PegasusConfig, T.PegasusForConditionalGeneration, **_BART), "encoder-decoder",
       note="Pre-LN, sinusoidal position tables"),
    _e("blenderbot", _m(T.BlenderbotConfig, T.BlenderbotForConditionalGeneration, **_BART), "encoder-decoder",
       note="Pre-LN, learned positions"),
    _e("m2m_100", _m(T.M2M100Config, T.M2M100ForConditionalGeneration, **_BART), "encoder-decoder",
       convert="either", note="Pre-LN, sinusoidal positions recomputed at run time"),
    _e("bart", _m(T.BartConfig, T.BartForConditionalGeneration, **_BART), "encoder-decoder", convert="refuse",
       note="Post-LN"),
    _e("marian", _m(T.MarianConfig, T.MarianMTModel, **_BART), "encoder-decoder", convert="refuse",
       note="Post-LN"),
    _e("blenderbot_small", _m(T.BlenderbotSmallConfig, T.BlenderbotSmallForConditionalGeneration, **_BART),
       "encoder-decoder", convert="refuse", note="Post-LN"),
    _e("t5", _m(T.T5Config, T.T5ForConditionalGeneration, vocab_size=V, d_model=D, d_kv=8, d_ff=I, num_layers=L,
                num_heads=H, decoder_start_token_id=1, pad_token_id=1, eos_token_id=2), "encoder-decoder",
       convert="exact", note="already RMSNorm (T5LayerNorm)"),
    # --- encoders ---
    _e("bert", REFUSED["bert"][0], "encoder", convert="refuse", note="Post-LN"),
    _e("roberta", _m(T.RobertaConfig, T.RobertaForMaskedLM, **_ENC | {"max_position_embeddings": 66}, **_TOK),
       "encoder", convert="refuse", note="Post-LN, position offset padding_idx+1"),
    _e("electra", _m(T.ElectraConfig, T.ElectraForMaskedLM, **_ENC, embedding_size=16), "encoder",
       convert="refuse", note="Post-LN, factorised embeddings"),
    _e("distilbert", _m(T.DistilBertConfig, T.DistilBertForMaskedLM, vocab_size=V, dim=D, n_layers=L, n_heads=H,
                        hidden_dim=I, max_position_embeddings=64), "encoder", convert="refuse", note="Post-LN"),
    _e("albert", _m(T.AlbertConfig, T.AlbertForMaskedLM, **_ENC, embedding_size=16), "encoder",
       convert="refuse", note="Post-LN, shared layers"),
    _e("xlm_roberta_xl", _m(T.XLMRobertaXLConfig, T.XLMRobertaXLForMaskedLM,
                            **_ENC | {"max_position_embeddings": 66}, **_TOK),
       "encoder", note="Pre-LN (XLM-R-XL), position offset padding_idx+1"),
    _e("esm", _m(T.EsmConfig, T.EsmForMaskedLM, **_ENC | {"max_position_embeddings": 66}, pad_token_id=1,
                 mask_token_id=3), "encoder", named=True, note="Pre-LN, LM head decoder(x) + bias"),
    _e("megatron_bert", _m(T.MegatronBertConfig, T.MegatronBertForMaskedLM, **_ENC), "encoder", named=True,
       note="Pre-LN, tied MLM decoder behind a transform"),
    # --- vision transformers ---
    _e("vit", FAMILIES["vit"], "vision", note="Pre-LN, CLS token"),
    _e("deit", _m(T.DeiTConfig, T.DeiTForImageClassification, **_VIT), "vision", note="Pre-LN, CLS token"),
    _e("deit_distilled", _m(T.DeiTConfig, T.DeiTForImageClassificationWithTeacher, **_VIT), "vision",
       note="Pre-LN, CLS + distillation tokens, two heads"),
    _e("vit_msn", _m(T.ViTMSNConfig, T.ViTMSNForImageClassification, **_VIT), "vision", note="Pre-LN"),
    _e("beit", _m(T.BeitConfig, T.BeitForImageClassification, **_VIT, vocab_size=V, use_mean_pooling=True),
       "vision", named=True, note="layer scale, mean pooling into the head norm"),
    _e("data2vec_vision", _m(T.Data2VecVisionConfig, T.Data2VecVisionForImageClassification, **_VIT,
                             use_mean_pooling=True), "vision", named=True, note="layer scale, mean pooling"),
    _e("dinov2", _m(T.Dinov2Config, T.Dinov2ForImageClassification, **_VIT, mlp_ratio=2), "vision", named=True,
       note="layer scale, CLS + mean patch token head"),
    _e("dinov2_registers", _m(T.Dinov2WithRegistersConfig, T.Dinov2WithRegistersForImageClassification, **_VIT,
                              mlp_ratio=2, num_register_tokens=2), "vision", note="layer scale, register tokens"),
    _e("siglip_vision", _m(T.SiglipVisionConfig, T.SiglipVisionModel, image_size=16, patch_size=4, hidden_size=D,
                           num_hidden_layers=L, num_attention_heads=H, intermediate_size=I), "vision",
       named=True, note="Pre-LN, attention-pooling head (MAP) reads the final norm",
       recipes=("inspect", "convert", "convert-f64")),
    _e("siglip_classifier", _siglip_cls, "vision", note="Pre-LN, mean pooling into the classifier"),
    _e("swin", _m(T.SwinConfig, T.SwinForImageClassification, image_size=16, patch_size=2, embed_dim=16,
                  depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5), "vision", convert="either",
       note="Pre-LN per stage, patch merging LayerNorms"),
    # --- video ---
    _e("videomae", _m(T.VideoMAEConfig, T.VideoMAEForVideoClassification, **_VIT, num_frames=4, tubelet_size=2,
                      use_mean_pooling=True), "video", note="5-D pixel values, mean pooling into fc_norm"),
    # --- audio ---
    _e("wav2vec2_stable", _m(T.Wav2Vec2Config, T.Wav2Vec2ForCTC, **_W2V, do_stable_layer_norm=True,
                             feat_extract_norm="layer"), "audio", convert="either",
       note="Pre-LN (stable layer norm); the positional conv writes GELU(conv(x)) into the stream"),
    _e("hubert", _m(T.HubertConfig, T.HubertForCTC, **_W2V), "audio", convert="refuse",
       note="Post-LN, GroupNorm feature extractor"),
    _e("wav2vec2_conformer", _m(T.Wav2Vec2ConformerConfig, T.Wav2Vec2ConformerForCTC, **_W2V,
                                conv_depthwise_kernel_size=3, position_embeddings_type="relative"), "audio",
       convert="refuse", note="conformer blocks end in a LayerNorm on the stream; Conv1d + BatchNorm1d"),
    _e("data2vec_audio", _m(T.Data2VecAudioConfig, T.Data2VecAudioForCTC, **_W2V | {"num_conv_pos_embeddings": 3}),
       "audio", convert="refuse", note="Post-LN"),
    # --- CNNs (BatchNorm) ---
    _e("resnet", _m(T.ResNetConfig, T.ResNetForImageClassification, **_CNN, embedding_size=8,
                    hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), "cnn", convert="refuse",
       note="BatchNorm, no LayerNorm"),
    _e("resnet_bottleneck_backbone", _m(T.ResNetConfig, T.ResNetBackbone, num_channels=3, embedding_size=8,
                                        hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
                                        out_features=["stage1", "stage2"]), "cnn", convert="refuse",
       note="*Backbone class: BackboneOutput"),
    _e("rt_detr_resnet", _m(T.RTDetrResNetConfig, T.RTDetrResNetBackbone, num_channels=3, embedding_size=8,
                            hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
                            out_features=["stage1", "stage2"]), "cnn", convert="refuse",
       note="RT-DETR ResNet backbone: BackboneOutput"),
    _e("regnet", _m(T.RegNetConfig, T.RegNetForImageClassification, **_CNN, embedding_size=8,
                    hidden_sizes=[8, 16], depths=[1, 1], groups_width=8), "cnn", convert="refuse",
       note="BatchNorm, squeeze-excitation"),
    _e("mobilenet_v1", _m(T.MobileNetV1Config, T.MobileNetV1ForImageClassification, **_CNN, image_size=32,
                          depth_multiplier=0.25, min_depth=4), "cnn", convert="refuse",
       note="depthwise-separable convs + BatchNorm"),
    _e("mobilenet_v2", _m(T.MobileNetV2Config, T.MobileNetV2ForImageClassification, **_CNN, image_size=32,
                          depth_multiplier=0.25, min_depth=4), "cnn", convert="refuse",
       note="inverted residuals + BatchNorm"),
    _e("levit", _m(T.LevitConfig, T.LevitForImageClassification, **_CNN, image_size=32, hidden_sizes=[16, 24, 32],
                   num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2],
                   attention_ratio=[2, 2, 2]), "cnn", convert="refuse", note="Linear + BatchNorm1d attention"),
    _e("convnext", _m(T.ConvNextConfig, T.ConvNextForImageClassification, **_CNN, num_stages=2,
                      hidden_sizes=[8, 16], depths=[1, 1], image_size=32), "cnn", convert="either",
       note="LayerNorm (channels-first and last) behind depthwise convs, no BatchNorm"),
    _e("dpt_hybrid", _dpt_hybrid, "cnn", convert="either",
       note="BiT (GroupNorm) + ViT, BatchNorm in the fusion blocks, DepthEstimatorOutput"),
]
ZOO: dict[str, ZooEntry] = {e.name: e for e in _ZOO}

# Architectures issue 10 lists that this transformers version cannot build at all (name -> why).
LEFT_OUT: dict[str, str] = {}


def randomise_extras(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm running statistics (mean 0.5N, var U(0.3, 2)) and layer scales (|init| or 0.1, x (1 + 0.5N)).

    Applied after ``randomise``, from a generator of its own, so ``randomise`` (and every test that uses it)
    is unchanged. Default statistics (mean 0, var 1) and layer scales equal across channels hide folding bugs.
    """
    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mean = torch.randn(mod.running_mean.shape, generator=gen)
                var = torch.rand(mod.running_var.shape, generator=gen)
                mod.running_mean.copy_(0.5 * mean)
                mod.running_var.copy_(0.3 + 1.7 * var)
            scale_mod = "layerscale" in type(mod).__name__.lower()
            for pname, p in mod.named_parameters(recurse=False):
                low = pname.lower()
                if scale_mod or low.startswith("lambda") or "layer_scale" in low or "layerscale" in low:
                    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
                    base = max(float(p.abs().mean()), 0.1)
                    p.copy_(base * (1.0 + 0.5 * noise))
    return model


def build_zoo(name: str, seed: int = 0) -> torch.nn.Module:
    """The zoo entry ``name`` with randomised weights, norms, biases, BN statistics and layer scales (eval)."""
    torch.manual_seed(seed)
    return randomise_extras(randomise(ZOO[name].factory(), seed), seed).eval()


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 12, seed: int = 1) -> dict:
    """Inputs for any zoo model, from its ``main_input_name`` and config (decoder inputs for encoder-decoders)."""
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    name = getattr(model, "main_input_name", "input_ids")
    vision = getattr(c, "vision_config", None) or c
    vocab = getattr(c, "vocab_size", None) or V
    if name == "pixel_values":
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        ch = getattr(vision, "num_channels", 3)
        if hasattr(c, "num_frames") and hasattr(c, "tubelet_size"):
            return {"pixel_values": torch.randn(batch, c.num_frames, ch, size, size, generator=gen)}
        return {"pixel_values": torch.randn(batch, ch, size, size, generator=gen)}
    if name == "input_features":
        out = {"input_features": torch.randn(batch, c.num_mel_bins, 2 * c.max_source_positions, generator=gen)}
    elif name == "input_values":
        return {"input_values": torch.randn(batch, 800, generator=gen)}
    else:
        out = {"input_ids": torch.randint(3, vocab, (batch, seq), generator=gen)}
    if getattr(c, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(3, vocab, (batch, 8), generator=gen)
    return out
