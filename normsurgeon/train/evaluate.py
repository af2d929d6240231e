"""Held-out next-token loss, the same protocol as ``examples/stdlib_corpus.heldout_loss``.

>>> import torch, transformers as T
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=1))
>>> 2.0 < heldout_loss(m, torch.randint(0, 16, (3, 8))) < 3.5  # untrained: about ln 16 = 2.77
True
"""
from __future__ import annotations

import torch


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ids[:, t+1] from ids[:, :t+1]: ids [B, T] -> scalar (or [B, T-1])."""
    logits = model(input_ids=ids).logits  # [B, T, V]
    pred = logits[:, :-1].float()  # [B, T-1, V]
    target = ids[:, 1:]  # [B, T-1]
    loss = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    if reduction == "none":
        return loss.view(target.shape)
    return loss.mean() if reduction == "mean" else loss.sum()


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over every predicted position of ``windows`` [n, T]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):  # [b, T]
        chunk = chunk.to(device)
        total += next_token_loss(model, chunk, reduction="sum").item()
        count += chunk.shape[0] * (chunk.shape[1] - 1)
    model.train(was_training)
    return total / count
