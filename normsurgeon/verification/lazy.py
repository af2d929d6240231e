"""A checkpoint as a model without its weights in memory: built on ``meta``, each unit's tensors read from
the safetensors files just before it runs and dropped right after.

A *unit* is one block of the model's ModuleLists, or any other module that owns parameters. Resident
memory is about the largest unit (in the compute dtype) instead of the whole model, which is what lets a
verification hold the source and the output at once. A model that uses a parameter outside its owner's
forward cannot run this way (``LazyUnsupported``; the caller loads it whole instead).

>>> import tempfile, pathlib, torch
>>> from normsurgeon.testing import tiny_gpt2
>>> from normsurgeon.conversion import convert
>>> d = pathlib.Path(tempfile.mkdtemp()); _ = convert("normsurgeon.testing:tiny_gpt2", d / "out", run_verify=False)
>>> with lazy_output(d / "out", stock=False) as conv, torch.no_grad():
...     logits = conv.model(input_ids=torch.arange(6)[None]).logits
>>> logits.shape[-1] == tiny_gpt2().config.vocab_size, conv.model.lm_head.weight.device.type
(True, 'meta')
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from normsurgeon.errors import InputError, UnsupportedModel
from normsurgeon.io.checkpoint import read_config
from normsurgeon.io.formats import rebuild_structure, section_guard, section_of, swap_to_rmsnorm
from normsurgeon.stream.headers import CheckpointIndex, read_checkpoint_index, read_tensor
from normsurgeon.stream.skeleton import block_lists, checkpoint_renames, meta_model, split_block
from normsurgeon.verification.metrics import compute_dtype_for


LAZY_FORMS = ("pre-rmsnorm", "pre-crmsnorm")  # normsurgeon outputs this module can rebuild on meta


class LazyUnsupported(UnsupportedModel):
    """The model uses a parameter outside its owner module's forward: it cannot run unit by unit."""


def skeleton(folder: Path, stock: bool = False) -> tuple[torch.nn.Module, dict, CheckpointIndex]:
    """The model of ``folder`` on meta, with a normsurgeon output's structure rebuilt (``stock=True``:
    the plain class as stock transformers builds it, for a stock-loadable output)."""
    cfg = read_config(folder)
    section = section_of(cfg)
    if section is not None and section.get("format") not in LAZY_FORMS:
        raise LazyUnsupported(f"its form ({section.get('format')}) is rebuilt by its own recipe")
    index = read_checkpoint_index(folder)
    if section is None or stock:
        return meta_model(cfg), cfg, index
    with section_guard(folder):
        return _rebuilt_skeleton(cfg, section, index), cfg, index


def _rebuilt_skeleton(cfg: dict, section: dict, index: CheckpointIndex) -> torch.nn.Module:
    base = dict(cfg)
    base["model_type"] = section["source_model_type"]
    base.pop("normsurgeon", None)
    base["architectures"] = [section["source_architecture"]]
    model = meta_model(base)
    shapes = {k: t.shape for k, t in index.tensors.items()}
    with torch.device("meta"):
        if section.get("stock_loadable", False) and not section.get("crms"):
            swap_to_rmsnorm(model, section)
        else:
            rebuild_structure(model, section, shapes)
    return model


def stored_dtype(index: CheckpointIndex) -> torch.dtype:
    """The dtype a checkpoint's floating tensors are stored in (its first floating tensor's)."""
    return next(t.dtype for t in index.tensors.values() if t.dtype.is_floating_point)


class LazyWeights:
    """Load each unit's parameters just before it runs and drop them right after.

    Each tensor is loaded in its meta placeholder's dtype: move the model with ``.to(dtype)`` to choose
    the compute dtype (also between runs: a float64 check retried in float32)."""

    def __init__(self, model: torch.nn.Module, index: CheckpointIndex):
        self.model, self.index = model, index
        renames = checkpoint_renames(model, list(index.tensors))
        by_runtime = {rt: ck for ck, rt in renames.items()}
        lists = block_lists(model)
        self.units: dict[str, list[tuple[torch.nn.Module, str, str]]] = {}
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        for owner_name, owner in model.named_modules():
            for attr, p in owner._parameters.items():
                if p is None:
                    continue
                full = f"{owner_name}.{attr}" if owner_name else attr
                ckpt = by_runtime.get(full) or next((by_runtime[a] for a in aliases[id(p)] if a in by_runtime), None)
                if ckpt is None:
                    raise UnsupportedModel(f"{index.folder} has no tensor for parameter {full}")
                hit = split_block(full, lists)
                unit = f"{hit[0]}.{hit[1]}" if hit else owner_name
                self.units.setdefault(unit, []).append((owner, attr, ckpt))
        self.hooks: list = []
        self.loaded_bytes = 0

    def load(self, unit: str) -> None:
        for owner, attr, ckpt in self.units[unit]:
            t = read_tensor(self.index.tensors[ckpt])
            dtype = owner._parameters[attr].dtype  # the meta placeholder's (see the class doc)
            owner._parameters[attr] = torch.nn.Parameter(t.to(dtype), requires_grad=False)
            self.loaded_bytes += t.numel() * t.element_size()

    def drop(self, unit: str) -> None:
        for owner, attr, _ in self.units[unit]:
            p = owner._parameters[attr]
            owner._parameters[attr] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                         requires_grad=False)

    @contextlib.contextmanager
    def attached(self, on_block=None):
        """Hooks that load/drop units; ``on_block(name, module, args, kwargs, output)`` sees each block.
        A forward that touches a parameter outside its unit raises ``LazyUnsupported``."""
        blocks = {f"{lst}.{i}" for lst, n in block_lists(self.model).items() for i in range(n)}
        for unit in self.units:
            mod = self.model.get_submodule(unit)
            is_block = unit in blocks

            def pre(m, args, kwargs, unit=unit):
                if not getattr(self, "_inner", False):
                    self.load(unit)

            def post(m, args, kwargs, output, unit=unit, is_block=is_block):
                if getattr(self, "_inner", False):
                    return None
                if is_block and on_block is not None:
                    on_block(unit, m, args, kwargs, output)
                self.drop(unit)
                return None

            self.hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            self.hooks.append(mod.register_forward_hook(post, with_kwargs=True))
        try:
            yield self
        except (RuntimeError, NotImplementedError) as e:
            if "meta" not in str(e):
                raise
            raise LazyUnsupported(f"running unit by unit needs every parameter to be used inside its module's "
                                  f"forward ({str(e).splitlines()[0][:160]})") from None
        finally:
            for h in self.hooks:
                h.remove()
            self.hooks = []
            for unit in self.units:  # a forward that raised mid-unit: nothing stays loaded
                self.drop(unit)


@contextlib.contextmanager
def lazy_output(folder: Path, *, stock: bool) -> Iterator:
    """``folder`` as a ``LoadedModel`` whose weights are read unit by unit while it runs, in the compute
    dtype a verification uses (float64 checkpoints in float64, everything else in float32)."""
    from normsurgeon.io.loader import LoadedModel

    folder = Path(folder)
    try:
        model, cfg, index = skeleton(folder, stock=stock)
        stored = stored_dtype(index)
        model.to(compute_dtype_for(stored)).eval()
        weights = LazyWeights(model, index)
    except (InputError, UnsupportedModel) as e:  # no transformers class to build on meta, an unmapped tensor
        raise LazyUnsupported(f"cannot be built without its weights: {e}") from None
    with weights.attached():
        # ``dtype`` is the stored one (what the verification judges); the meta parameters are in ``compute``.
        yield LoadedModel(model, str(folder), "folder", folder, cfg, stored, section_of(cfg))
