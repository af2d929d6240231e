"""Write a folded PRepBN model as a normsurgeon output folder, and load it back (``load_prepbn``).

The folder keeps the source's tensor names, minus the norms. config.json is the source config with
``model_type`` renamed ``normsurgeon_<type>`` (stock transformers refuses it loudly: its norms are gone)
and a section::

    "normsurgeon": {"format": "prepbn", "version": 1, "source_model_type": "vit",
                    "source_architecture": "ViTForImageClassification", "stock_loadable": false,
                    "identity": [...norms...], "created_bias": [...], "rmsnorm": {}, "crms": null,
                    "prepbn": {...schedule, eta per norm...}}

``identity`` and ``created_bias`` follow ``normsurgeon.io.formats.rebuild_structure``. Plain torch models
(factories) record ``"factory"`` instead of an architecture.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from normsurgeon import __version__
from normsurgeon.errors import InputError
from normsurgeon.io.formats import CUSTOM_PREFIX, rebuild_structure
from normsurgeon.io.loader import load_recorded_state, source_model

FORMAT = "prepbn"


def output_config(source_config: dict, model: torch.nn.Module, identity: list[str], created_bias: list[str],
                  untied: list[str], dtype: str, extra: dict, factory: str | None = None) -> dict:
    cfg = dict(source_config) if source_config else {}
    hf = getattr(model, "config", None) is not None
    if hf and not cfg:
        cfg = model.config.to_dict()
    cfg.pop("torch_dtype", None)
    cfg.pop("normsurgeon", None)
    if untied:
        cfg["tie_word_embeddings"] = False
    section = {"format": FORMAT, "version": 1, "normsurgeon_version": __version__,
               "source_model_type": cfg.get("model_type"), "source_architecture": type(model).__name__,
               "stock_loadable": False, "identity": list(identity), "created_bias": sorted(created_bias),
               "untied": list(untied), "rmsnorm": {}, "crms": None, "prepbn": extra}
    if not hf:
        section["factory"] = factory
    if cfg.get("model_type"):
        cfg["model_type"] = CUSTOM_PREFIX + cfg["model_type"]
    if hf:
        cfg["architectures"] = [type(model).__name__]
        cfg["dtype"] = dtype
    cfg["normsurgeon"] = section
    return cfg


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise InputError(f"{path} is missing {f}")
        state.update(load_file(str(path / f)))
    return state


def load_prepbn(path: str | Path) -> torch.nn.Module:
    """Load a ``prepbn`` output folder (eval mode): the source class with its norms as ``Identity``."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
        section = cfg["normsurgeon"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        raise InputError(f"{path} is not a prepbn output (no normsurgeon section in config.json)") from None
    if section.get("format") != FORMAT:
        raise InputError(f"{path} is a {section.get('format')!r} output, not {FORMAT!r}")
    state = _read_state(path)
    if section.get("factory"):
        from normsurgeon.io.loader import load_model

        model = load_model(section["factory"]).model
    else:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        model = source_model(cfg, section)
    # identity norms and created biases, as every custom normsurgeon output records them
    rebuild_structure(model, section, {k: tuple(v.shape) for k, v in state.items()})
    return load_recorded_state(model, state, str(path)).eval()


def load_form(req):
    """The ``prepbn`` output form (``normsurgeon.io.forms``, entry point ``prepbn``); a stock load
    (``req.stock``) is left to the generic loader."""
    from normsurgeon.io.loader import LoadedModel

    if req.stock:
        return None
    model = load_prepbn(req.path)
    cfg = json.loads((req.path / "config.json").read_text())
    return LoadedModel(model, req.ref, "folder", req.path, cfg, next(model.parameters()).dtype, req.section)
