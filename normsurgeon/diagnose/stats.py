"""Running per-state statistics of hidden states (float64 accumulators, one update per micro-batch).

State ``i`` is the input of block ``i`` (state 0: what the embeddings put on the residual stream) and,
for ``i >= 1``, the raw output of block ``i - 1``: taken with hooks, never from ``hidden_states``
(whose last entry is after the final norm in transformers 5).

>>> import torch
>>> s = StateStats()
>>> s.update(torch.ones(2, 3, 4))
>>> r = s.result(); r["second_moment"], r["variance"], r["median_abs"]
(1.0, 0.0, 1.0)
"""
from __future__ import annotations

import math

import torch

TOP_K = 3


class StateStats:
    """Accumulates moments, per-sequence top-|h| and median-|h|, and last-token vectors of one state."""

    def __init__(self) -> None:
        self.total = 0.0
        self.total_sq = 0.0
        self.count = 0
        self.token_rms_sum = 0.0
        self.tokens = 0
        self.top_per_seq: list[list[float]] = []  # per sequence: top-3 |h|
        self.median_per_seq: list[float] = []
        self.global_top = (0.0, -1, -1, -1)  # (|h|, sequence, position, channel)
        self.last_token: list[torch.Tensor] = []  # [b, d] float64 chunks

    def update(self, h: torch.Tensor, seq_offset: int = 0) -> None:
        """``h``: [b, T, d] (any float dtype; detached here)."""
        h = h.detach()
        hd = h.to(torch.float64)  # [b, T, d]
        b, t, d = hd.shape
        self.total += float(hd.sum())
        sq = hd.pow(2)  # [b, T, d]
        self.total_sq += float(sq.sum())
        self.count += hd.numel()
        self.token_rms_sum += float(sq.mean(-1).sqrt().sum())
        self.tokens += b * t
        a = h.abs().reshape(b, -1).float()  # [b, T*d]
        top, idx = a.topk(min(TOP_K, a.shape[1]), dim=1)  # [b, k]
        self.top_per_seq.extend(top.tolist())
        self.median_per_seq.extend(a.median(dim=1).values.tolist())
        j = int(top[:, 0].argmax())
        if float(top[j, 0]) > self.global_top[0]:
            flat = int(idx[j, 0])
            self.global_top = (float(top[j, 0]), seq_offset + j, flat // d, flat % d)
        self.last_token.append(hd[:, -1, :].clone())  # [b, d]

    def result(self) -> dict:
        mean = self.total / self.count
        second = self.total_sq / self.count
        tops = torch.tensor(self.top_per_seq, dtype=torch.float64)  # [n, k]
        median = sum(self.median_per_seq) / len(self.median_per_seq)
        top1 = float(tops[:, 0].mean())
        return {
            "second_moment": second,  # E[h^2] over tokens and channels
            "rms": math.sqrt(second),
            "variance": max(second - mean * mean, 0.0),  # over all tokens and channels
            "mean": mean,
            "token_rms_mean": self.token_rms_sum / self.tokens,
            "top_abs": [float(v) for v in tops.mean(0)],  # top-3 |h| per sequence, averaged over sequences
            "median_abs": median,  # median |h| per sequence, averaged
            "massive_ratio": top1 / median if median > 0 else math.inf,  # top-1 / median (Sun et al. 2024)
            "max_abs": {"value": self.global_top[0], "sequence": self.global_top[1],
                        "position": self.global_top[2], "channel": self.global_top[3]},
        }

    def last_tokens(self) -> torch.Tensor:
        return torch.cat(self.last_token)  # [n, d]


def angular_distance_matrix(states: list[torch.Tensor]) -> torch.Tensor:
    """D[i, j] = mean over sequences of arccos(cos(x_i, x_j)) / pi, for last-token states [n, d] each.

    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0]]); y = torch.tensor([[0.0, 1.0]])
    >>> angular_distance_matrix([x, y, -x]).tolist()
    [[0.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 0.0]]
    """
    u = torch.stack([s.to(torch.float64) for s in states])  # [S, n, d]
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = torch.einsum("ind,jnd->ijn", u, u).clamp(-1.0, 1.0)  # [S, S, n]
    d = torch.arccos(cos) / math.pi
    return torch.nan_to_num(d, nan=0.5).mean(-1)  # [S, S]
