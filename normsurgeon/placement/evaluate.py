"""Loss change and output agreement between a source model and its placed rewrite.

>>> import torch, transformers as T
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
>>> r = compare(m, m, torch.randint(0, 32, (2, 8)))
>>> r["delta_loss"], r["top1_agreement"]
(0.0, 1.0)
"""
from __future__ import annotations

import torch


@torch.no_grad()
def compare(source: torch.nn.Module, placed: torch.nn.Module, ids: torch.Tensor, micro_batch: int = 4) -> dict:
    """Mean next-token loss of both on ``ids`` [n, T], its change, max |Δlogit|, max |Δlog-prob|, top-1 agreement."""
    tot = {"src": 0.0, "new": 0.0}
    n_tok, agree, max_logit, max_lp = 0, 0, 0.0, 0.0
    for start in range(0, ids.shape[0], micro_batch):
        mb = ids[start:start + micro_batch]  # [b, T]
        a = source(input_ids=mb, use_cache=False).logits.double()  # [b, T, V]
        b = placed(input_ids=mb, use_cache=False).logits.double()
        target = mb[:, 1:].reshape(-1)
        for key, lg in (("src", a), ("new", b)):
            tot[key] += float(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), target, reduction="sum"))
        n_tok += target.numel()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        max_logit = max(max_logit, float((a - b).abs().max()))
        max_lp = max(max_lp, float((a.log_softmax(-1) - b.log_softmax(-1)).abs().max()))
    before, after = tot["src"] / n_tok, tot["new"] / n_tok
    return {"loss_before": before, "loss_after": after, "delta_loss": after - before,
            "max_abs_logit_diff": max_logit, "max_abs_logprob_diff": max_lp,
            "top1_agreement": agree / (ids.shape[0] * ids.shape[1]), "windows": list(ids.shape)}
