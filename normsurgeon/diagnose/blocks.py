"""Find a model's repeated blocks (decoder layers) without relying on names.

The blocks are the children of the ``ModuleList`` holding the most parameters whose children all share
one class (``transformer.h`` in GPT-2, ``model.layers`` in Llama).

>>> import transformers as T
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=3, n_head=2))
>>> path, blocks = find_block_list(m)
>>> path, len(blocks)
('transformer.h', 3)
"""
from __future__ import annotations

import torch

from normsurgeon.errors import UnsupportedModel


def _n_params(mod: torch.nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def find_block_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(dotted path, ModuleList) of the model's main stack of repeated blocks."""
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        size = _n_params(mod)
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise UnsupportedModel(f"{type(model).__name__} has no ModuleList of repeated blocks to diagnose")
    return best[1], best[2]


def ffn_module(block: torch.nn.Module) -> torch.nn.Module | None:
    """The block's feed-forward child: ``mlp``/``feed_forward``/``ffn`` or, failing that, the child
    holding the most >=2-D parameters that is not an attention module."""
    for name in ("mlp", "feed_forward", "ffn", "ff", "mlp_block"):
        child = getattr(block, name, None)
        if isinstance(child, torch.nn.Module):
            return child
    cands = [(sum(p.numel() for p in c.parameters() if p.dim() >= 2), n, c) for n, c in block.named_children()
             if "attn" not in n.lower() and "attention" not in n.lower()]
    cands = [c for c in cands if c[0] > 0]
    return max(cands, key=lambda c: c[0])[2] if cands else None
