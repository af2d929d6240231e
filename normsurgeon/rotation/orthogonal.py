"""Orthogonal matrices for rotating a residual stream, all float64 [d, d], applied as ``x -> x Q``.

- ``random_orthogonal``: Haar-random, the QR of a seeded Gaussian with the signs of R's diagonal fixed.
- ``random_hadamard``: QuaRot's randomised Hadamard ``diag(s) H / sqrt(d)`` (random signs s first: the
  all-ones direction, which an RMSNorm model's stream carries, goes to ``s H``, spread over every channel;
  ``H diag(s)`` would put it into channel 0).
- ``mean_preserving_random`` / ``mean_preserving_hadamard``: orthogonal with ``Q 1 = 1`` (hence also
  ``Q^T 1 = 1``): a zero-mean stream stays zero-mean, so the stock LayerNorm of a converted Pre-LN model
  keeps computing RMSNorm exactly and the output stays stock-loadable. The random one is
  ``u u^T + B R B^T`` (u = 1/sqrt(d), B a basis of the complement of u, R Haar on that complement); the
  Hadamard one is ``H diag(s) H^T / d`` with the normalised H (first row and column +1) and s_0 = +1.
- ``rotation_matrix``: the dispatcher ``rotate`` uses, with the fallback to a random Q when no Hadamard
  matrix of order d is buildable (``hadamard.py`` lists the orders).

>>> Q = mean_preserving_hadamard(12, seed=3)
>>> is_orthogonal(Q), keeps_ones(Q)
(True, True)
>>> Q, info = rotation_matrix(6, "hadamard", seed=0)
>>> info["method"], is_orthogonal(Q)
('random', True)
"""
from __future__ import annotations

import math

import torch

from normsurgeon.rotation.hadamard import hadamard, hadamard_order_parts

METHODS = ("hadamard", "random")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    """Haar-random orthogonal [d, d] float64: Q from QR of a seeded Gaussian, columns signed by diag(R)."""
    g = torch.randn(d, d, generator=_generator(seed), dtype=torch.float64)  # [d, d]
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).clamp_min(0).mul(2).sub(1)[None, :]  # sign(0) -> +1


def random_signs(d: int, seed: int = 0) -> torch.Tensor:
    """d random +-1 (float64), seeded."""
    u = torch.rand(d, generator=_generator(seed + 1_000_003), dtype=torch.float64)
    return torch.where(u < 0.5, -1.0, 1.0).to(torch.float64)


def random_hadamard(d: int, seed: int = 0) -> torch.Tensor:
    """``diag(s) H / sqrt(d)``: orthogonal, every entry +-1/sqrt(d) (ValueError if no H of order d)."""
    return random_signs(d, seed)[:, None] * hadamard(d) / math.sqrt(d)


def householder_to_ones(d: int) -> torch.Tensor:
    """The symmetric orthogonal reflection P with ``P e_0 = 1/sqrt(d)``: its columns 1.. span the
    complement of the all-ones direction. [d, d] float64."""
    u = torch.full((d,), 1.0 / math.sqrt(d), dtype=torch.float64)
    v = -u
    v[0] += 1.0  # v = e_0 - u
    nv = float(v @ v)
    if nv < 1e-30:  # d == 1
        return torch.eye(d, dtype=torch.float64)
    return torch.eye(d, dtype=torch.float64) - 2.0 * torch.outer(v, v) / nv


def mean_preserving_random(d: int, seed: int = 0) -> torch.Tensor:
    """``u u^T + B R B^T``: a Haar rotation of the complement of the ones direction, ``Q 1 = 1``."""
    p = householder_to_ones(d)
    inner = torch.eye(d, dtype=torch.float64)
    if d > 1:
        inner[1:, 1:] = random_orthogonal(d - 1, seed)  # [d-1, d-1]
    return p @ inner @ p


def mean_preserving_hadamard(d: int, seed: int = 0) -> torch.Tensor:
    """``H diag(s) H^T / d`` with the normalised Hadamard H and s_0 = +1: symmetric, orthogonal, ``Q 1 = 1``."""
    h = hadamard(d)
    s = random_signs(d, seed)
    s[0] = 1.0
    return (h * s[None, :]) @ h.T / d


def is_orthogonal(q: torch.Tensor, tol: float = 1e-10) -> bool:
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    return bool((q.double() @ q.double().T - eye).abs().max() <= tol)


def keeps_ones(q: torch.Tensor, tol: float = 1e-10) -> bool:
    """``Q 1 = 1`` and ``Q^T 1 = 1``: a zero-mean row vector x stays zero-mean under ``x -> x Q``."""
    ones = torch.ones(q.shape[0], dtype=torch.float64)
    return bool((q.double() @ ones - ones).abs().max() <= tol and (q.double().T @ ones - ones).abs().max() <= tol)


def rotation_matrix(d: int, method: str = "hadamard", seed: int = 0, mean_preserving: bool = False
                    ) -> tuple[torch.Tensor, dict]:
    """The [d, d] float64 Q for ``method`` and what was built (``info["method"]`` is "random" when a
    Hadamard matrix of order d does not exist here; ``info["note"]`` says so)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    info = {"requested": method, "method": method, "seed": int(seed), "size": int(d),
            "mean_preserving": bool(mean_preserving), "note": ""}
    if method == "hadamard":
        parts = hadamard_order_parts(d)
        if parts is None:
            info["method"] = "random"
            info["note"] = (f"no Hadamard matrix of order {d} is buildable (orders m * 2^k with m a Paley order); "
                            "used a random orthogonal Q instead")
        else:
            info["hadamard_parts"] = list(parts)
            q = mean_preserving_hadamard(d, seed) if mean_preserving else random_hadamard(d, seed)
            return q, info
    q = mean_preserving_random(d, seed) if mean_preserving else random_orthogonal(d, seed)
    return q, info
