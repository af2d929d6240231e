"""The ``normsurgeon`` section of a converted model's config.json, and rebuilding modules from it.

A converted folder keeps the source's tensor names. Its config.json gains a section such as::

    "normsurgeon": {"format": "pre-rmsnorm", "version": 1, "source_model_type": "gpt2",
                    "source_architecture": "GPT2LMHeadModel", "stock_loadable": true,
                    "rmsnorm": {"transformer.h.0.ln_1": 1e-05, ...}, "identity": [], "created_bias": [],
                    "crms": null}

Two kinds of output (README, "Loading converted models"):
- stock-loadable (``stock_loadable: true``): the stock class loads it as is; its LayerNorms then see a
  zero-mean residual and compute exactly what RMSNorm computes. ``normsurgeon.load`` swaps them for
  ``normsurgeon.modules.RMSNorm``.
- custom (baked embedding norms, created biases, Pre-CRMSNorm): ``model_type`` is renamed to
  ``normsurgeon_<type>`` so stock transformers refuses it loudly instead of loading different weights;
  ``normsurgeon.load`` rebuilds the structure. No remote code is involved in either case.

>>> section_of({"model_type": "gpt2"}) is None
True
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from normsurgeon.errors import InputError
from normsurgeon.modules import CentredLayerNorm, CRMSNorm, DyT, RMSNorm
from normsurgeon.module_tree import set_module

CUSTOM_PREFIX = "normsurgeon_"


def section_of(config: dict) -> dict | None:
    sec = config.get("normsurgeon")
    return sec if isinstance(sec, dict) else None


def norm_width(norm: torch.nn.Module) -> int:
    """The normalized width of a norm module: ``normalized_shape`` where it has one, else its gain's
    length (Cohere's LayerNorm keeps only ``weight``)."""
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[0] if isinstance(shape, (tuple, list)) else shape)
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise InputError(f"cannot tell the width of {type(norm).__name__}: no normalized_shape and no weight")
    return int(weight.shape[-1])


@contextlib.contextmanager
def section_guard(folder: Path | str) -> Iterator[None]:
    """Rebuilding a model from its ``normsurgeon`` section: a section that was edited by hand (wrong
    types, names the model lacks, missing keys) is an input error (exit 5), not an internal one.

    >>> try:
    ...     with section_guard("out"):
    ...         {"rmsnorm": "x"}["rmsnorm"].items()
    ... except InputError as e:
    ...     print(e.exit_code)
    5
    """
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"the normsurgeon section of {folder}/config.json does not describe this checkpoint "
                         f"(edited by hand?): {type(e).__name__}: {what}"[:400]) from None


def rebuild_structure(model: torch.nn.Module, section: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give ``model`` (built from the source config) the converted structure described by ``section``.

    ``shapes`` maps checkpoint tensor names to shapes (read from safetensors headers), so parameters get
    the stored shapes before the state dict is loaded.
    """
    for name in section.get("identity", []):
        set_module(model, name, torch.nn.Identity())
    for name in section.get("centred") or []:  # embedding norms over several tables (modules.CentredLayerNorm)
        old = model.get_submodule(name)
        set_module(model, name, CentredLayerNorm(norm_width(old), old.eps, getattr(old, "weight", None),
                                                 getattr(old, "bias", None)))
    crms = section.get("crms")
    for name, eps in section.get("rmsnorm", {}).items():
        old = model.get_submodule(name)
        if crms:
            new: torch.nn.Module = CRMSNorm(crms["full_size"], eps)
        else:
            size = norm_width(old)
            w = torch.ones(size) if f"{name}.weight" in shapes else None
            b = torch.zeros(size) if f"{name}.bias" in shapes else None
            new = RMSNorm(size, eps, weight=w, bias=b, gain_offset=(section.get("gain_offset") or {}).get(name, 0.0))
        set_module(model, name, new)
    for name, spec in (section.get("dyt") or {}).items():  # remove-ln --to dyt (normsurgeon.lnfree.dyt)
        set_module(model, name, DyT(spec["size"], weight=spec["weight_attr"] is not None,
                                     bias=spec["bias_attr"] is not None, weight_attr=spec["weight_attr"] or "weight",
                                     bias_attr=spec["bias_attr"] or "bias"))
    for name in section.get("created_bias", []):
        mod = model.get_submodule(name)
        mod.bias = torch.nn.Parameter(torch.zeros(shapes[f"{name}.bias"]), requires_grad=False)
    if crms:
        _reshape_to_checkpoint(model, shapes, crms)


def _reshape_to_checkpoint(model: torch.nn.Module, shapes: dict, crms: dict) -> None:
    """Pre-CRMSNorm: give the residual writers and readers their d-1 shapes and fix width attributes."""
    params = dict(model.named_parameters())
    for key, shape in shapes.items():
        p = params.get(key)
        if p is None or tuple(p.shape) == tuple(shape):
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, attr, torch.nn.Parameter(torch.zeros(shape, dtype=p.dtype), requires_grad=False))
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(mod, torch.nn.Linear):
            mod.out_features, mod.in_features = w.shape
        elif isinstance(mod, torch.nn.Embedding):
            mod.embedding_dim = w.shape[1]
        elif isinstance(mod, torch.nn.modules.conv._ConvNd):
            mod.out_channels = w.shape[0]
        elif hasattr(mod, "nf") and w.dim() == 2:
            mod.nx, mod.nf = w.shape


def swap_to_rmsnorm(model: torch.nn.Module, section: dict) -> None:
    """Replace the stock norms named in a stock-loadable output's section by ``modules.RMSNorm`` with the
    same parameters: the model as ``normsurgeon.load`` gives it (the stock load keeps LayerNorm modules,
    which compute RMSNorm on the zero-mean stream)."""
    offsets = section.get("gain_offset") or {}
    for name, eps in section.get("rmsnorm", {}).items():
        old = model.get_submodule(name)
        new = RMSNorm(norm_width(old), eps, weight=getattr(old, "weight", None),
                      bias=getattr(old, "bias", None), gain_offset=offsets.get(name, 0.0))
        set_module(model, name, new)
