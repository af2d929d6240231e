"""Equivalence metrics between two models' outputs, and the per-dtype thresholds.

Log-probabilities are compared, not logits: centring may move every logit of a position by the same
constant, which changes nothing a user can observe.

>>> import torch
>>> a = torch.randn(2, 3, 5, dtype=torch.float64)
>>> m = output_metrics(a, a + 7.0)
>>> m["max_abs_logprob"] < 1e-12, m["top1_agreement"]
(True, 1.0)
"""
from __future__ import annotations

import torch

# Per stored dtype: max |delta log-prob|, mean KL(source || converted), top-1 agreement.
THRESHOLDS = {
    "float64": {"max_abs_logprob": 1e-10, "mean_kl": 1e-16, "top1_agreement": 1.0},
    "float32": {"max_abs_logprob": 1e-4, "mean_kl": 1e-8, "top1_agreement": 1.0},
    "bfloat16": {"max_abs_logprob": 1.5e-1, "mean_kl": 1e-2, "top1_agreement": 0.95},
    "float16": {"max_abs_logprob": 3e-2, "mean_kl": 1e-3, "top1_agreement": 0.98},
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def output_metrics(src_logits: torch.Tensor, conv_logits: torch.Tensor, margin: float = 0.0) -> dict:
    """Compare two logit tensors [..., classes]. ``margin``: top-1 agreement counts only positions whose
    source top-2 gap exceeds it (a near-tie may flip within round-off)."""
    a = src_logits.double().log_softmax(-1)
    b = conv_logits.double().log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1)  # [...]
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    two = a.topk(2, dim=-1).values if a.shape[-1] > 1 else torch.cat([a, a - 1e9], -1)
    decided = (two[..., 0] - two[..., 1]) > margin
    agree = (top_a == top_b)[decided]
    return {
        "max_abs_logprob": (a - b).abs().max().item(),
        "mean_kl": kl.mean().clamp_min(0).item(),
        "top1_agreement": agree.double().mean().item() if agree.numel() else 1.0,
        "top1_agreement_all": (top_a == top_b).double().mean().item(),
        "max_abs_logit": (src_logits.double() - conv_logits.double()).abs().max().item(),
        "positions": int(top_a.numel()),
    }


def residual_error(src: torch.Tensor, conv: torch.Tensor) -> dict:
    """Relative L2 error between the centred source stream and the converted one (width d or d-1)."""
    s = src.double()
    s = s - s.mean(-1, keepdim=True)
    c = conv.double()
    s = s[..., : c.shape[-1]]
    err = (s - c).norm() / s.norm().clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(s.flatten(), c.flatten(), dim=0)
    return {"resid_rel_l2": err.item(), "resid_cosine": cos.item()}


def judge(metrics: dict, dtype: str) -> dict:
    """Attach thresholds and pass/fail per metric."""
    th = THRESHOLDS.get(dtype, THRESHOLDS["float32"])
    out = {}
    for name, value in metrics.items():
        if name in th:
            ok = value >= th[name] if name == "top1_agreement" else value <= th[name]
            out[name] = {"value": value, "threshold": th[name], "ok": bool(ok)}
        else:
            out[name] = {"value": value, "threshold": None, "ok": None}
    return out
