"""Models without weights: the full model on ``meta`` (names, shapes, tying) and a shallow *probe* to trace.

The probe has the source's widths but only ``probe_layers`` blocks and at most ``PROBE_VOCAB`` tokens,
and its large parameters are stride-0 views of one random row, so tracing a 13B-shaped probe costs a few
hundred MB, not 50 GB.
Small parameters (norms, biases) are real random tensors, non-zero, so the plan made on the probe
assumes every norm shift is non-zero (the executor re-decides with the checkpoint's values).

>>> import transformers as T
>>> cfg = T.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=5, n_head=2,
...                    architectures=["GPT2LMHeadModel"]).to_dict()
>>> full = meta_model(cfg)
>>> probe = probe_model(cfg, probe_layers=2)
>>> len(full.transformer.h), len(probe.transformer.h), full.transformer.wte.weight.device.type
(5, 2, 'meta')
"""
from __future__ import annotations

import contextlib
import re
import warnings

import torch

from normsurgeon.errors import InputError, UnsupportedModel

_SMALL = 1 << 16  # parameters up to this many elements are materialised for real in the probe
PROBE_VOCAB = 2048  # the probe's vocabulary when the source's is larger


def model_class(config: dict):
    from normsurgeon.io.loader import transformers_class

    cls = transformers_class(config)
    if cls is not None:
        return cls
    archs = config.get("architectures") or []
    if config.get("auto_map"):
        raise UnsupportedModel("streaming conversion does not run remote code; convert in memory with "
                               "--trust-remote-code instead")
    raise InputError(f"config.json names no transformers class ({archs or 'no architectures'})")


def hf_config(config: dict):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise InputError("config.json has no model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise InputError(f"cannot build the {model_type} config: {e}") from None


def _build(config_obj, cls, initialise: bool = True) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with init_empty_weights(include_buffers=False), (contextlib.nullcontext() if initialise else _no_init()):
            model = cls(config_obj)
        if hasattr(model, "tie_weights"):  # accelerate's meta init re-creates tied parameters: tie them again
            model.tie_weights()
    return model.eval()


def _no_init():
    """Skip weight initialisation (it only draws random numbers on ``meta``); a no-op where unavailable."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def meta_model(config: dict) -> torch.nn.Module:
    """The full model with every parameter on ``meta``: names, shapes and tying only (buffer values unused)."""
    return _build(hf_config(config), model_class(config), initialise=False)


def probe_model(config: dict, probe_layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A traceable model with the source's widths and at most ``probe_layers`` blocks (see module doc)."""
    cfg = hf_config(config)
    layers = getattr(cfg, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > probe_layers:
        cfg.num_hidden_layers = probe_layers
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int) and vocab > PROBE_VOCAB:
        # The token tables are read through F.embedding/F.linear, which copy a stride-0 weight into a
        # real one: at full vocabulary that is vocab x d floats (1 GB for OPT-13B) for nothing. Plans
        # do not depend on the vocabulary size (names and roles only); the padding id must stay valid.
        pad = getattr(cfg, "pad_token_id", None)
        cfg.vocab_size = max(PROBE_VOCAB, pad + 1 if isinstance(pad, int) else 0)
    model = _build(cfg, model_class(config))
    gen = torch.Generator().manual_seed(seed)
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, name))
                params[id(p)] = p
    for pid, p in params.items():
        shape = tuple(p.shape)
        if p.numel() <= _SMALL or p.dim() < 2:
            value = 0.5 + torch.rand(shape, generator=gen)  # non-zero, positive: gains and shifts alike
        else:
            value = (0.02 * torch.randn(shape[-1], generator=gen)).expand(shape)  # stride-0 rows
        new = torch.nn.Parameter(value.to(p.dtype), requires_grad=False)
        for mod, name in owners[pid]:
            mod._parameters[name] = new
    return model


def block_lists(model: torch.nn.Module) -> dict[str, int]:
    """Every non-empty ModuleList and its length: the model's repeated blocks."""
    return {name: len(m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)}


def checkpoint_renames(meta: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Map checkpoint tensor names to the model's runtime names, as ``from_pretrained`` would rename them.

    Only pure renamings are supported; a checkpoint that needs tensor conversions (fused experts, split
    qkv) is refused for streaming.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(meta) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_sd = meta.state_dict()
    prefix = getattr(meta, "base_model_prefix", None) or None
    out = {}
    for name in names:
        new, pattern = rename_source_key(name, renamings, converters, prefix, meta_sd)
        if pattern is not None:
            raise UnsupportedModel(f"checkpoint tensor {name} needs a tensor conversion ({pattern}) when loaded; "
                                   "streaming handles renamed tensors only: convert in memory")
        out[name] = new
    return out


_INDEX = re.compile(r"^(?P<list>.+?)\.(?P<i>\d+)(?:\.|$)")


def split_block(name: str, lists: dict[str, int]) -> tuple[str, int] | None:
    """(ModuleList name, index) for a name inside one of ``lists``, choosing the longest list prefix."""
    best = None
    for lst in lists:
        if name.startswith(lst + "."):
            rest = name[len(lst) + 1:]
            head = rest.split(".", 1)[0]
            if head.isdigit() and (best is None or len(lst) > len(best[0])):
                best = (lst, int(head))
    return best
