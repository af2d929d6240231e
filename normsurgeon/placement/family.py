"""Family adapters: where a Llama- or GPT-2-family model keeps its blocks, norms and projections.

Recognised by structure (attribute names *and* the norm map's roles, checked in ``apply.check_source``),
so a Gemma-style model whose ``post_attention_layernorm`` is an output norm is not mistaken for Llama.

>>> import transformers as T
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=2, n_head=2))
>>> family_of(m).name
'gpt2'
"""
from __future__ import annotations

import dataclasses

import torch

from normsurgeon.errors import UnsupportedModel


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # "llama" | "gpt2"
    layers: str  # path of the ModuleList of blocks
    final_norm: str
    embed_out: str  # module whose output is what the embeddings add to the stream (hooked for embedding norms)
    attn: str
    mlp: str
    in_norms: tuple[str, str]  # (attention input norm, MLP input norm)
    q: str | None = None  # separate projections inside ``attn`` (None: fused)
    k: str | None = None
    v: str | None = None
    o: str | None = None
    ffn_weights: tuple[str, ...] = ()  # DeepNorm beta: FFN linears inside ``mlp``

    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.layers)


LLAMA = Family("llama", "model.layers", "model.norm", "model.embed_tokens", "self_attn", "mlp",
               ("input_layernorm", "post_attention_layernorm"), "q_proj", "k_proj", "v_proj", "o_proj",
               ("gate_proj", "up_proj", "down_proj"))
GPT2 = Family("gpt2", "transformer.h", "transformer.ln_f", "transformer.drop", "attn", "mlp", ("ln_1", "ln_2"),
              None, None, None, "c_proj", ("c_fc", "c_proj"))


def _has(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def family_of(model: torch.nn.Module) -> Family:
    """The adapter whose layout ``model`` has, or ``UnsupportedModel`` naming what is missing."""
    for fam in (LLAMA, GPT2):
        if not (_has(model, fam.layers) and _has(model, fam.final_norm) and _has(model, fam.embed_out)):
            continue
        blocks = fam.blocks(model)
        need = (fam.attn, fam.mlp) + fam.in_norms
        if all(all(_has(b, n) for n in need) for b in blocks):
            if fam is GPT2 and getattr(model.config, "add_cross_attention", False):
                raise UnsupportedModel("GPT-2 with cross-attention is not supported by `place`")
            return fam
    raise UnsupportedModel(f"`place` supports Llama-family (model.layers[i].input_layernorm/self_attn/"
                           f"post_attention_layernorm/mlp) and GPT-2-family (transformer.h[i].ln_1/attn/ln_2/mlp) "
                           f"models; {type(model).__name__} has neither layout")


def head_dim(model: torch.nn.Module, fam: Family) -> int:
    cfg = model.config
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads
