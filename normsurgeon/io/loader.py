"""Load a model for surgery or comparison: Hugging Face folders, cached hub ids, factories, and
normsurgeon's own converted folders.

Outputs whose form a recipe defines (fold-bn's deploy form, prepbn, placement) are loaded by the form
loader that recipe registers (``normsurgeon.io.forms``); this module imports no recipe.

>>> lm = load_model("normsurgeon.testing:tiny_gpt2")
>>> lm.kind, type(lm.model).__name__
('factory', 'GPT2LMHeadModel')
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from normsurgeon.errors import InputError
from normsurgeon.io.checkpoint import FolderInfo, check_folder
from normsurgeon.io.factory import resolve_attribute
from normsurgeon.io.formats import (CUSTOM_PREFIX, rebuild_structure, section_guard, section_of,
                                    swap_to_rmsnorm)
from normsurgeon.io.forms import FormRequest, form_loader
from normsurgeon.io.resolve import resolve


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run (eval mode) and where it came from."""

    model: torch.nn.Module
    ref: str
    kind: str  # "folder" | "factory"
    path: Path | None
    config: dict
    dtype: torch.dtype
    converted: dict | None  # the normsurgeon section when the folder is a normsurgeon output


def load_model(ref: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
               revision: str | None = None, stock: bool = False) -> LoadedModel:
    """Load ``ref`` in eval mode with its stored dtype.

    ``stock=True`` loads a normsurgeon output with the plain Hugging Face class (no module swaps), which
    is how a user without normsurgeon would see it.
    """
    r = resolve(ref, revision)
    if r.kind == "factory":
        return load_factory(r.ref)
    section = _peek_section(r.path)
    if section is None:
        return _load_folder(ref, r.path, None, allow_pickle, trust_remote_code, stock)
    with section_guard(r.path):
        return _load_folder(ref, r.path, section, allow_pickle, trust_remote_code, stock)


def _load_folder(ref: str, path: Path, section: dict | None, allow_pickle: bool, trust_remote_code: bool,
                 stock: bool) -> LoadedModel:
    if section is not None:
        load = form_loader(section.get("format"))  # the recipe's own form (io/forms.py), if it has one
        loaded = load(FormRequest(ref, path, section, stock, allow_pickle, trust_remote_code)) if load else None
        if loaded is not None:
            return loaded
    info = check_folder(path, allow_pickle=allow_pickle)
    if section is not None and not section.get("stock_loadable", False) and not stock:
        model = _load_custom(info, section)
    else:
        model = _load_hf(info, trust_remote_code, allow_pickle)
        if section is not None and not stock:
            swap_to_rmsnorm(model, section)
    model.eval()
    dtype = next(model.parameters()).dtype
    return LoadedModel(model, ref, "folder", path, info.config, dtype, section)


def _peek_section(path: Path) -> dict | None:
    if not (path / "config.json").is_file():  # never open a FIFO or device: check_folder reports it
        return None
    try:
        return section_of(json.loads((path / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # check_folder reports a missing or broken config with its own message


def load_factory(ref: str) -> LoadedModel:
    """Call the factory ``package.module:function`` (or take the module it names) and load it in eval mode."""
    factory = resolve_attribute(ref)
    model = factory() if callable(factory) else factory
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"factory {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    cfg = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    return LoadedModel(model, ref, "factory", None, cfg, next(model.parameters()).dtype, None)


def load_stock_folder(path: Path) -> torch.nn.Module:
    """The folder's model with its stock Hugging Face class (safetensors only, no remote code), as a user
    without normsurgeon would load it."""
    return _load_hf(check_folder(path), trust_remote_code=False, allow_pickle=False)


def transformers_class(config: dict):
    """The first class named in ``config["architectures"]`` that transformers ships, or None."""
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return None


def _model_class(config: dict, trust_remote_code: bool):
    import transformers

    archs = config.get("architectures") or []
    cls = transformers_class(config)
    if cls is not None:
        return cls
    if config.get("auto_map"):
        if not trust_remote_code:
            raise InputError(f"the model's class ({', '.join(archs) or 'auto_map'}) is remote code; pass "
                             "--trust-remote-code if you trust its source")
        return None
    if config.get("model_type", "").startswith(CUSTOM_PREFIX):
        raise InputError("this is a normsurgeon output with a custom structure: load it with normsurgeon")
    return transformers.AutoModel


def _load_hf(info: FolderInfo, trust_remote_code: bool, allow_pickle: bool) -> torch.nn.Module:
    """``from_pretrained`` reading only the weights ``check_folder`` chose: safetensors with
    ``use_safetensors=True`` (so transformers cannot fall back to a pickle beside them); pickles, with
    ``weights_only=True``, only with ``allow_pickle``, also when the safetensors do not cover the model."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls = _model_class(info.config, trust_remote_code)
    kwargs = dict(dtype="auto", output_loading_info=True, local_files_only=True, weights_only=True)
    if cls is None:
        cls = transformers.AutoModel
        kwargs["trust_remote_code"] = True
    if info.weights_format == "pickle":
        return _from_pretrained(cls, info, dict(kwargs, use_safetensors=False))
    try:
        return _from_pretrained(cls, info, dict(kwargs, use_safetensors=True))
    except InputError as e:
        if not info.pickle_files:
            raise
        if not allow_pickle:
            raise InputError(f"{e}; the folder's pickle weights ({info.pickle_files[0].name}) were not read: pass "
                             "--allow-pickle to load them with weights_only=True") from None
    return _from_pretrained(cls, info, dict(kwargs, use_safetensors=False))


def _from_pretrained(cls, info: FolderInfo, kwargs: dict) -> torch.nn.Module:
    """One ``from_pretrained`` call; an unreadable folder or one whose weights do not cover (or do not
    match) the model is an InputError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, report = cls.from_pretrained(str(info.path), **kwargs)
    except InputError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load {info.path}: config and weights disagree or are unreadable ({first})") from None
    problems = []
    keys = ("missing_keys", "mismatched_keys")
    if section_of(info.config) is not None:  # our own outputs: a dropped tensor is a different function
        keys += ("unexpected_keys",)
    for key in keys:
        items = report.get(key) or []
        if items:
            problems.append(f"{len(items)} {key.replace('_', ' ')} (e.g. {sorted(map(str, items))[0]})")
    if problems:
        raise InputError(f"config and weights in {info.path} disagree: " + "; ".join(problems))
    return model


def source_model(config: dict, section: dict) -> torch.nn.Module:
    """A fresh instance of the source class recorded in a normsurgeon output's config section."""
    import transformers

    cfg = {k: v for k, v in config.items() if k != "normsurgeon"}
    cfg["model_type"] = section["source_model_type"]  # undo the normsurgeon_<type> rename
    cls = getattr(transformers, section.get("source_architecture") or "", None)
    if cls is None:
        raise InputError(f"transformers has no class {section.get('source_architecture')!r}")
    return cls(transformers.AutoConfig.for_model(**cfg))


def load_recorded_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """Cast ``model`` to the stored dtype and load ``state`` into it; every parameter must be covered and
    nothing may be left over (non-persistent buffers excepted)."""
    model.to(next(iter(state.values())).dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {n for n, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise InputError(f"{where} does not match its recorded structure "
                         f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return model


def _load_custom(info: FolderInfo, section: dict) -> torch.nn.Module:
    """Rebuild a normsurgeon output whose structure the stock class cannot hold."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in info.weight_files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                state[k] = sf.get_tensor(k)
    model = source_model(info.config, section)
    rebuild_structure(model, section, {k: tuple(v.shape) for k, v in state.items()})
    return load_recorded_state(model, state, f"converted checkpoint {info.path}")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
