"""The deploy form: rebuild it from the source structure, export it with ``torch.export``, load it back.

A fold-bn output folder holds the stock-loadable checkpoint at its root and the deploy form in
``deploy/``: ``model.safetensors`` (BN-free weights), the structure edits in config.json's
``normsurgeon`` section (``identity``, ``zero``, ``bias_added``) and ``model.pt2`` (a torch.export program
that needs neither normsurgeon nor the model's Python class).

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.BatchNorm2d(2))
>>> apply_structure(m, {"identity": ["1"], "zero": [], "bias_added": ["0"]})
>>> type(m[1]).__name__, m[0].bias.shape
('Identity', torch.Size([2]))
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from normsurgeon.batchnorm.apply import ZeroBranch
from normsurgeon.module_tree import set_module
from normsurgeon.errors import InputError

FORMAT = "fold-bn"


def apply_structure(model: torch.nn.Module, structure: dict) -> None:
    """Turn the source structure into the deploy structure (in place); weights are loaded afterwards."""
    for name in structure.get("bias_added", []):
        layer = model.get_submodule(name)
        if layer.bias is None:
            n = layer.weight.shape[1] * layer.groups if _is_transposed(layer) else layer.weight.shape[0]
            layer.bias = torch.nn.Parameter(torch.zeros(n, dtype=layer.weight.dtype), requires_grad=False)
    for name in structure.get("identity", []):
        set_module(model, name, torch.nn.Identity())
    for name in structure.get("zero", []):
        set_module(model, name, ZeroBranch())


def _is_transposed(layer: torch.nn.Module) -> bool:
    return bool(getattr(layer, "transposed", False))


def count_batch_norm_ops(program) -> int:
    """Batch-norm calls left in an exported program's graph."""
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))


def export_program(model: torch.nn.Module, args: tuple, kwargs: dict, path: Path) -> dict:
    """``torch.export`` the deploy model on the example inputs (static shapes) and save it to ``path``."""
    try:
        program = torch.export.export(model.eval(), tuple(args), dict(kwargs), strict=False)
    except Exception as e:  # noqa: BLE001 - export limits are reported, the checkpoint stays valid
        return {"file": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    torch.export.save(program, str(path))
    shapes = {k: list(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    shapes.update({f"arg{i}": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)})
    return {"file": path.name, "batch_norm_ops": count_batch_norm_ops(program), "input_shapes": shapes}


def load_deploy(path: str | Path) -> torch.nn.Module:
    """Load a fold-bn output folder in its deploy form (BN modules gone), eval mode.

    Hugging Face outputs are rebuilt from their stock class; factory outputs by calling the factory
    recorded in the section.
    """
    from safetensors.torch import load_file

    from normsurgeon.io.loader import load_model

    path = Path(path)
    try:
        section = json.loads((path / "config.json").read_text())["normsurgeon"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise InputError(f"{path} is not a fold-bn output (no normsurgeon section in config.json)") from None
    if section.get("format") != FORMAT:
        raise InputError(f"{path} is a {section.get('format')!r} output, not {FORMAT!r}")
    base = load_model(section["factory"]) if section.get("factory") else load_model(str(path), stock=True)
    model = base.model
    apply_structure(model, section["deploy"])
    state = load_file(str(path / "deploy" / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise InputError(f"{path}/deploy does not match its recorded structure "
                         f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return model.eval()


def load_form(req):
    """The ``fold-bn`` output form (``normsurgeon.io.forms``, entry point ``fold-bn``): the deploy form (BN
    modules gone) unless ``req.stock``; factory outputs either way."""
    from safetensors.torch import load_file

    from normsurgeon.io.loader import LoadedModel, load_factory, load_stock_folder

    path, section = req.path, req.section
    if req.stock and section.get("factory"):
        model = load_factory(section["factory"]).model
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    elif req.stock:
        model = load_stock_folder(path)
    else:
        model = load_deploy(path)
    model.eval()
    cfg = json.loads((path / "config.json").read_text())
    return LoadedModel(model, req.ref, "folder", path, cfg, next(model.parameters()).dtype, section)
