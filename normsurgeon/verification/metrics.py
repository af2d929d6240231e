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


def compute_dtype_for(stored: torch.dtype) -> torch.dtype:
    """float64 checkpoints are checked in float64; everything else in float32 (half types upcast on CPU)."""
    return torch.float64 if stored == torch.float64 else torch.float32


def output_metrics(src_logits: torch.Tensor, conv_logits: torch.Tensor, margin: float = 0.0,
                   chunk: int = 32) -> dict:
    """Compare two logit tensors [..., classes]. ``margin``: top-1 agreement counts only positions whose
    source top-2 gap exceeds it (a near-tie may flip within round-off). Positions are compared ``chunk``
    at a time, so the float64 copies stay small whatever the vocabulary."""
    classes = src_logits.shape[-1]
    a_all, b_all = src_logits.reshape(-1, classes), conv_logits.reshape(-1, classes)  # [positions, classes]
    n = a_all.shape[0]
    max_lp = max_logit = kl_sum = 0.0
    agree = decided = agree_all = 0
    for i in range(0, n, chunk):
        a = a_all[i:i + chunk].double().log_softmax(-1)
        b = b_all[i:i + chunk].double().log_softmax(-1)
        kl_sum += (a.exp() * (a - b)).sum().item()
        top_a, top_b = a.argmax(-1), b.argmax(-1)
        two = a.topk(2, dim=-1).values if classes > 1 else torch.cat([a, a - 1e9], -1)
        ok = (two[..., 0] - two[..., 1]) > margin
        agree += int((top_a == top_b)[ok].sum())
        decided += int(ok.sum())
        agree_all += int((top_a == top_b).sum())
        max_lp = max(max_lp, (a - b).abs().max().item())
        max_logit = max(max_logit, (a_all[i:i + chunk].double() - b_all[i:i + chunk].double()).abs().max().item())
    return {
        "max_abs_logprob": max_lp,
        "mean_kl": max(kl_sum / max(n, 1), 0.0),
        "top1_agreement": agree / decided if decided else 1.0,
        "top1_agreement_all": agree_all / max(n, 1),
        "max_abs_logit": max_logit,
        "positions": int(n),
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


def cast_thresholds(dtype: str, cast: dict) -> dict:
    """Thresholds for a conversion that also casts to ``dtype``: the dtype's own, or twice what the cast
    alone does to the source (``cast``: its metrics), whichever is looser. The conversion is judged
    against the cast, because no exact rewrite can beat rounding its own weights.

    >>> cast_thresholds("bfloat16", {"max_abs_logprob": 0.2, "mean_kl": 1e-4, "top1_agreement": 0.97})
    {'max_abs_logprob': 0.4, 'mean_kl': 0.01, 'top1_agreement': 0.94}
    """
    th = dict(THRESHOLDS.get(dtype, THRESHOLDS["float32"]))
    th["max_abs_logprob"] = max(th["max_abs_logprob"], 2 * cast["max_abs_logprob"])
    th["mean_kl"] = max(th["mean_kl"], 2 * cast["mean_kl"])
    th["top1_agreement"] = round(min(th["top1_agreement"], 1 - 2 * (1 - cast["top1_agreement"])), 12)
    return th


def judge(metrics: dict, dtype: str, thresholds: dict | None = None) -> dict:
    """Attach thresholds and pass/fail per metric (``thresholds``: per-metric overrides of the dtype's)."""
    th = {**THRESHOLDS.get(dtype, THRESHOLDS["float32"]), **(thresholds or {})}
    out = {}
    for name, value in metrics.items():
        if name in th:
            ok = value >= th[name] if name == "top1_agreement" else value <= th[name]
            out[name] = {"value": value, "threshold": th[name], "ok": bool(ok)}
        else:
            out[name] = {"value": value, "threshold": None, "ok": None}
    return out
