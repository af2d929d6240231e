"""Tiny models for doctests and for trying the CLI on a factory (``normsurgeon.testing:tiny_gpt2``).

>>> type(tiny_gpt2()).__name__
'GPT2LMHeadModel'
"""
from __future__ import annotations

import torch


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT-2 (d=32, vocab 96) with randomised norm gains/shifts and biases."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = T.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.5 * torch.randn(mod.bias.shape, generator=gen))
    return model.eval()
