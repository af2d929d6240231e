"""How far a model is from its own float64 evaluation, without a float64 copy of the model.

Each module's own parameters and floating buffers are cast to float64 just before its forward and put
back just after (forward hooks), so at most the modules on the current call path hold float64 copies:
about one layer's weights, not the model's. A large ``nn.Linear`` or ``nn.Embedding`` (a 50k-token head
or table: 300 MB in float64) is never cast whole: the head computes ``CHUNK_BYTES`` of its rows at a
time, the table upcasts only the rows it gathers. The values are those of
``model.double()`` (the upcast is exact; a chunked head differs from one matmul only in float64's own
last bits); a model that uses a tensor outside its owner's forward (a dtype error) falls back to a
float64 copy.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 3)).eval()
>>> x = {"input": torch.randn(2, 4)}
>>> with float64_forward(m):
...     out = m(x["input"].double())
>>> out.dtype, next(m.parameters()).dtype
(torch.float64, torch.float32)
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

F64 = torch.float64
CHUNK_BYTES = 32 * 2**20  # float64 bytes of a large Linear's rows cast at a time; also the size above which
#                           a Linear or Embedding is never cast whole (``float64_forward``)


@contextlib.contextmanager
def _swapped(model: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor | None],
             skip: frozenset[int] = frozenset()) -> Iterator[None]:
    """Inside, each module's own floating tensors are ``change(t)`` (where not None) during its forward
    (modules whose ``id`` is in ``skip`` are left alone)."""
    hooks = []
    saved: dict[int, list] = {}

    def pre(mod: torch.nn.Module, args) -> None:
        if id(mod) in skip:
            return
        entry = []
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            new = change(t) if t is not None and t.is_floating_point() else None
            if new is not None:
                entry.append((t, t.data))
                t.data = new
        saved.setdefault(id(mod), []).append(entry)

    def post(mod: torch.nn.Module, args, out) -> None:
        if id(mod) in skip:
            return
        for t, data in reversed(saved[id(mod)].pop()):
            t.data = data

    for mod in model.modules():
        if mod._parameters or mod._buffers:
            hooks.append(mod.register_forward_pre_hook(pre))
            hooks.append(mod.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for stack in saved.values():  # a forward that raised: put every tensor back
            for entry in reversed(stack):
                for t, data in reversed(entry):
                    t.data = data
            stack.clear()


@contextlib.contextmanager
def float64_forward(model: torch.nn.Module) -> Iterator[None]:
    """Inside, ``model`` computes in float64 (parameters upcast module by module during its forward) and
    torch's default dtype is float64; outside, it is unchanged."""
    large = [m for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Embedding)
             and "forward" not in m.__dict__ and m.weight.dtype != F64 and m.weight.numel() * 8 > CHUNK_BYTES
             and getattr(m, "max_norm", None) is None]
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    for m in large:
        m.forward = _chunked_linear(m) if type(m) is torch.nn.Linear else _gathered_embedding(m)
    try:
        with _swapped(model, lambda t: t.data.to(F64) if t.dtype != F64 else None, frozenset(map(id, large))):
            yield
    finally:
        torch.set_default_dtype(old)
        for m in large:
            del m.forward  # back to the class's forward


def _gathered_embedding(mod: torch.nn.Embedding) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod``'s forward in float64 without a float64 table: gather the rows, then upcast them (the same
    values, since the upcast is exact)."""
    def forward(ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, mod.weight, mod.padding_idx).to(F64)  # [..., d]

    return forward


def _chunked_linear(mod: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod``'s forward in float64 with its weight cast a chunk of output rows at a time.

    >>> lin = torch.nn.Linear(3, 5).eval()
    >>> x = torch.randn(2, 3, dtype=F64)
    >>> torch.allclose(_chunked_linear(lin)(x), F.linear(x, lin.weight.double(), lin.bias.double()))
    True
    """
    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = mod.weight, mod.bias  # [out, in], [out] (read at call time: lazily loaded weights work)
        step = max(1, CHUNK_BYTES // (8 * w.shape[1]))
        x = x.to(F64)
        y = torch.empty(*x.shape[:-1], w.shape[0], dtype=F64)  # [..., out]
        for r0 in range(0, w.shape[0], step):
            r1 = min(w.shape[0], r0 + step)
            y[..., r0:r1] = F.linear(x, w[r0:r1].to(F64), None if b is None else b[r0:r1].to(F64))
        return y

    return forward


@contextlib.contextmanager
def rounded_forward(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Inside, ``model``'s weights are rounded to ``dtype`` (kept in their own dtype for the compute):
    the model a plain cast to ``dtype`` would give, computed as the verification computes the output.

    >>> lin = torch.nn.Linear(2, 1, bias=False).double().eval()
    >>> _ = torch.nn.init.constant_(lin.weight, 1 + 2**-12)
    >>> with torch.no_grad(), rounded_forward(lin, torch.bfloat16):
    ...     y = lin(torch.ones(1, 2, dtype=torch.float64))
    >>> float(y), float(lin.weight[0, 0]) == 1 + 2**-12
    (2.0, True)
    """
    with _swapped(model, lambda t: t.data.to(dtype).to(t.dtype) if t.dtype != dtype else None):
        yield


def float64_output(model: torch.nn.Module, batch: dict, run: Callable[[torch.nn.Module, dict], torch.Tensor]
                   ) -> torch.Tensor:
    """The output of ``model`` on ``batch`` computed in float64 (``run(model, batch)`` returns the output
    tensor); without a float64 copy where the model allows it."""
    x = {k: (v.to(F64) if v.is_floating_point() else v) for k, v in batch.items()}
    try:
        with torch.no_grad(), float64_forward(model):
            return run(model, x).double()
    except RuntimeError as e:
        if "dtype" not in str(e).lower() and "double" not in str(e).lower() and "float" not in str(e).lower():
            raise
    copy64 = copy.deepcopy(model).to(F64)  # a tensor used outside its owner's forward: the plain way
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        with torch.no_grad():
            return run(copy64, x).double()
    finally:
        torch.set_default_dtype(old)
        del copy64


def max_logprob_gap(a: torch.Tensor, b: torch.Tensor, rows: int = 32) -> float:
    """max |log_softmax(a) - log_softmax(b)| over the last axis, in float64, ``rows`` positions at a time
    (no float64 copy of a whole [batch, seq, vocab] output).

    >>> a = torch.randn(2, 5, 7, dtype=F64)
    >>> max_logprob_gap(a, a + 3.0) < 1e-12
    True
    """
    x, y = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # [positions, vocab]
    gap = 0.0
    for i in range(0, x.shape[0], rows):
        d = x[i:i + rows].double().log_softmax(-1) - y[i:i + rows].double().log_softmax(-1)
        gap = max(gap, d.abs().max().item())
    return gap
