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
    factory = FAMILIES[family] if family in FAMILIES else REFUSED[family][0]
    torch.manual_seed(seed)
    return randomise(factory(), seed)


def model_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 12, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        c = model.config
        return {"pixel_values": torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=gen)}
    return {"input_ids": torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)}
