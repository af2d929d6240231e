"""Pure per-tensor rotation ops ``f(w, b, layout, Q) -> (w, b)``: what a rotation does to one writer or
reader of the residual stream, for every layout of ``transforms/primitives.py``. A streaming executor can
call them tensor by tensor. Inputs and Q in float64; nothing is modified in place.

The stream is a row vector ``x`` [..., d] and becomes ``x Q``. Both sides come down to "multiply the
residual feature axis by Q": ``T'[.., j', ..] = sum_j T[.., j, ..] Q[j, j']``.

Writers (their output is added to the stream, the output side becomes ``y Q``):

| layout | weight | residual axis | bias |
|---|---|---|---|
| linear | [d, in] | 0 (``W' = Q^T W``) | ``b Q`` |
| conv1d (GPT-2) | [in, d] | 1 (``W' = W Q``) | ``b Q`` |
| conv | [d, in/g, *k] | 0 | ``b Q`` |
| embedding | [vocab, d] | 1 | - |
| param | [..., d] | last | - |
| param:k (stacked experts) | e.g. [E, d, ff] | k | - |

Readers (they read a normalised stream, now ``n Q``; the input side absorbs Q so ``W' (n Q) = W n``):
linear [out, d] axis 1 (``W' = W Q``), conv1d [d, out] axis 0 (``W' = Q^T W``), conv [out, d, *k] axis 1
(groups = 1 only), embedding-as-head [vocab, d] axis 1, param [..., d] last, param:k axis k. Biases of
readers are unchanged.

>>> import torch
>>> from normsurgeon.rotation.orthogonal import random_orthogonal
>>> Q = random_orthogonal(4, seed=0)
>>> lin = torch.nn.Linear(3, 4).double(); h = torch.randn(5, 3, dtype=torch.float64)
>>> w, b = rotate_writer(lin.weight, lin.bias, "linear", Q)
>>> torch.allclose(h @ w.T + b, lin(h) @ Q)
True
>>> rd = torch.nn.Linear(4, 2).double(); x = torch.randn(5, 4, dtype=torch.float64)
>>> w2, b2 = rotate_reader(rd.weight, rd.bias, "linear", Q)
>>> torch.allclose((x @ Q) @ w2.T + b2, rd(x))
True
"""
from __future__ import annotations

import torch

WRITER_AXIS = {"linear": 0, "conv": 0, "conv1d": 1, "embedding": 1, "param": -1}
READER_AXIS = {"linear": 1, "conv1d": 0, "conv": 1, "embedding": 1, "param": -1}


def residual_axis(layout: str, side: str) -> int:
    """The axis of a ``layout`` tensor that runs over the residual features, as a ``writer`` or a ``reader``."""
    if layout.startswith("param:"):
        return int(layout.split(":", 1)[1])
    table = WRITER_AXIS if side == "writer" else READER_AXIS
    if layout not in table:
        raise ValueError(f"cannot rotate a {side} with layout {layout!r}")
    return table[layout]


def along(t: torch.Tensor, axis: int, q: torch.Tensor) -> torch.Tensor:
    """``t`` with its axis ``axis`` (length d) multiplied by ``q`` [d, d]: ``sum_j t[.., j, ..] q[j, j']``."""
    if t.shape[axis] != q.shape[0]:
        raise ValueError(f"axis {axis} of a {tuple(t.shape)} tensor has {t.shape[axis]} entries, Q is {q.shape[0]}")
    moved = t.movedim(axis, -1)  # [..., d]
    return (moved @ q).movedim(-1, axis).contiguous()  # [..., d] @ [d, d] -> back in place


def rotate_writer(w: torch.Tensor, b: torch.Tensor | None, layout: str, q: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A residual writer whose output y becomes ``y Q`` (weight along its output axis, bias ``b Q``)."""
    w2 = along(w, residual_axis(layout, "writer"), q)
    b2 = b @ q if isinstance(b, torch.Tensor) and layout not in ("embedding", "param") \
        and not layout.startswith("param:") else b  # [d] @ [d, d]
    return w2, b2


def rotate_reader(w: torch.Tensor, b: torch.Tensor | None, layout: str, q: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A reader of the normalised stream ``n``, fed ``n Q`` from now on: ``W' (n Q) = W n``; bias unchanged."""
    return along(w, residual_axis(layout, "reader"), q), b


def rotate_shift(shift: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A norm's shift (a row vector added to the normalised stream) moved through Q: ``beta Q``. [d]"""
    return shift @ q


def rotate_heads_out(w: torch.Tensor, b: torch.Tensor | None, layout: str, r: torch.Tensor, heads: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-head R2 on a value projection's output (heads x head_dim features): each head's values v_h
    become ``v_h R`` (R [hd, hd]). ``layout``: "linear" [heads*hd, in] or "conv1d" [in, heads*hd]."""
    hd = r.shape[0]
    axis = 0 if layout == "linear" else 1
    if w.shape[axis] != heads * hd:
        raise ValueError(f"{heads} heads of {hd} do not match {w.shape[axis]} outputs")
    block = torch.block_diag(*[r] * heads)  # [H*hd, H*hd]
    return along(w, axis, block), (b @ block if isinstance(b, torch.Tensor) else b)


def rotate_heads_in(w: torch.Tensor, layout: str, r: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head R2 on an output projection's input: it reads ``o_h R`` per head, so ``W'`` absorbs R."""
    hd = r.shape[0]
    axis = 1 if layout == "linear" else 0
    if w.shape[axis] != heads * hd:
        raise ValueError(f"{heads} heads of {hd} do not match {w.shape[axis]} inputs")
    return along(w, axis, torch.block_diag(*[r] * heads))
