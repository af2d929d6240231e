"""How far a model is from its own float64 evaluation, without a float64 copy of the model.

Each module's own parameters and floating buffers are cast to float64 just before its forward and put
back just after (forward hooks), so at most the modules on the current call path hold float64 copies:
about one layer's weights, not the model's. The values are exactly those of ``model.double()`` (the
upcast is exact); a model that uses a tensor outside its owner's forward (a dtype error) falls back to a
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

F64 = torch.float64


@contextlib.contextmanager
def _swapped(model: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Inside, each module's own floating tensors are ``change(t)`` (where not None) during its forward."""
    hooks = []
    saved: dict[int, list] = {}

    def pre(mod: torch.nn.Module, args) -> None:
        entry = []
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            new = change(t) if t is not None and t.is_floating_point() else None
            if new is not None:
                entry.append((t, t.data))
                t.data = new
        saved.setdefault(id(mod), []).append(entry)

    def post(mod: torch.nn.Module, args, out) -> None:
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
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        with _swapped(model, lambda t: t.data.to(F64) if t.dtype != F64 else None):
            yield
    finally:
        torch.set_default_dtype(old)


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


def float64_logprobs(model: torch.nn.Module, batch: dict, run: Callable[[torch.nn.Module, dict], torch.Tensor]
                     ) -> torch.Tensor:
    """log-probabilities of ``model`` on ``batch`` computed in float64 (``run(model, batch)`` returns the
    output tensor); without a float64 copy where the model allows it."""
    x = {k: (v.to(F64) if v.is_floating_point() else v) for k, v in batch.items()}
    try:
        with torch.no_grad(), float64_forward(model):
            return run(model, x).double().log_softmax(-1)
    except RuntimeError as e:
        if "dtype" not in str(e).lower() and "double" not in str(e).lower() and "float" not in str(e).lower():
            raise
    copy64 = copy.deepcopy(model).to(F64)  # a tensor used outside its owner's forward: the plain way
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        with torch.no_grad():
            return run(copy64, x).double().log_softmax(-1)
    finally:
        torch.set_default_dtype(old)
        del copy64
