"""Hadamard matrices (entries +-1, ``H H^T = n I``) of every order this module can build, in float64.

Orders: Sylvester's ``2^k``; Paley I (``q + 1`` for a prime ``q = 3 mod 4``) and Paley II (``2(q + 1)``
for a prime ``q = 1 mod 4``); and the Kronecker product of one of those with a Sylvester matrix, so
``n = m * 2^k`` works whenever some ``m * 2^j`` (``j <= k``) is a Paley order: 12 * 64 = 768 (GPT-2),
20 * 256 = 5120, 4096 = 2^12 (Llama). Every matrix is returned *normalised*: first row and first column
all +1, so ``H 1 = n e_0`` and ``H^T 1 = n e_0`` (what the mean-preserving rotations use).

>>> H = hadamard(12)
>>> bool((H @ H.T == 12 * torch.eye(12, dtype=torch.float64)).all()), H[0].tolist() == [1.0] * 12
(True, True)
>>> hadamard_order_parts(768), hadamard_order_parts(6)
((12, 64), None)
"""
from __future__ import annotations

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``n`` (a power of two), normalised and symmetric: [n, n]."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices exist for powers of two, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # [2m, 2m]
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q: [q, q]."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley(n: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order ``n`` (normalised), or None when ``n`` is not a Paley order here."""
    q = n - 1
    if n >= 4 and _is_prime(q) and q % 4 == 3:  # Paley I: H = I + S, S skew conference matrix
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0] = 1.0, -1.0
        s[1:, 1:] = _jacobsthal(q)
        return normalise(torch.eye(n, dtype=torch.float64) + s)
    q = n // 2 - 1
    if n % 2 == 0 and n >= 12 and _is_prime(q) and q % 4 == 1:  # Paley II from a symmetric conference matrix
        c = torch.zeros(n // 2, n // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0] = 1.0, 1.0
        c[1:, 1:] = _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return normalise(torch.kron(c, a) + torch.kron(torch.eye(n // 2, dtype=torch.float64), b))
    return None


def normalise(h: torch.Tensor) -> torch.Tensor:
    """Flip column and row signs so the first row and the first column are all +1 (still Hadamard)."""
    h = h * h[0:1, :]  # columns: first row becomes +1
    return h * h[:, 0:1]  # rows: first column becomes +1


def hadamard_order_parts(n: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``m * 2^k = n`` and a Hadamard matrix of order ``m`` buildable here (``m = 1``:
    pure Sylvester), the smallest such ``m``; None when there is none."""
    if n < 1:
        return None
    odd, two = n, 1
    while odd % 2 == 0:
        odd //= 2
        two *= 2
    m, rest = odd, two
    while rest >= 1:
        if m == 1 or m == 2 or paley(m) is not None:
            return (1, n) if m <= 2 else (m, rest)
        m, rest = m * 2, rest // 2
        if rest < 1:
            break
    return None


def hadamard(n: int) -> torch.Tensor:
    """A normalised Hadamard matrix of order ``n`` as float64 [n, n]; ValueError when none is buildable."""
    parts = hadamard_order_parts(n)
    if parts is None:
        raise ValueError(f"no Hadamard matrix of order {n} can be built here (orders m * 2^k with m a Paley "
                         "order: q + 1 for a prime q = 3 mod 4, 2(q + 1) for a prime q = 1 mod 4)")
    m, two = parts
    if m == 1:
        return sylvester(two)
    return normalise(torch.kron(paley(m), sylvester(two)))
