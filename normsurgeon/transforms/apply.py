"""Carry out an ``RmsPlan`` on a model in memory: the conversion engine computes the output tensors
(``normsurgeon/stream/``, the same jobs ``convert`` writes to disk), then the model's modules are rebuilt
to the converted structure (``io.formats.rebuild_structure``, what the loader does) and the tensors
loaded into it. Use it where a module must be rewritten in place (tests, fine-tuning set-ups); ``convert``
writes the engine's tensors straight to shards instead.

>>> import torch, transformers as T
>>> from normsurgeon.graph.normmap import build_norm_map
>>> from normsurgeon.transforms.plan import plan_rms_conversion
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval().double()
>>> ids = torch.randint(0, 64, (1, 5)); ref = m(ids).logits.log_softmax(-1)
>>> apply_rms_plan(m, plan_rms_conversion(m, build_norm_map(m), "rmsnorm"))
>>> bool((m(ids).logits.log_softmax(-1) - ref).abs().max() < 1e-10)
True
"""
from __future__ import annotations

import torch

from normsurgeon.io.formats import rebuild_structure
from normsurgeon.transforms.plan import RmsPlan
from normsurgeon.transforms.steps import DEFAULT_STEPS, STEPS  # noqa: F401  (STEPS: the registry recipes check)


def structure_section(plan: RmsPlan, steps: list[str] | None = None) -> dict:
    """The structural part of the output's ``normsurgeon`` config section: which modules become
    RMSNorm / CRMSNorm, identity (baked), centred, which layers gain a bias."""
    steps = DEFAULT_STEPS[plan.target] if steps is None else steps
    return {
        "rmsnorm": plan.replace if "replace_norms" in steps else {},
        "gain_offset": plan.gain_offsets,
        "identity": [n for n, _ in plan.bake] if "bake_embedding_norms" in steps else [],
        "centred": plan.recentre,
        "created_bias": sorted(set(plan.created_bias)) if "fold_norm_affine" in steps else [],
        "crms": {"full_size": plan.hidden_size} if "shrink_residual" in steps else None,
    }


def mark_untied(model: torch.nn.Module) -> None:
    """Record in the model's config (and its text sub-config) that input and output embeddings are separate."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.tie_word_embeddings = False
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
        if text is not None:
            text.tie_word_embeddings = False


def apply_rms_plan(model: torch.nn.Module, plan: RmsPlan, steps: list[str] | None = None) -> None:
    """Rewrite ``model`` (any float dtype; the math is float64, cast once) into Pre-RMSNorm / Pre-CRMSNorm
    form, in place, as the plan says."""
    from normsurgeon.stream.execute import run_to_state_dict
    from normsurgeon.stream.plan import plan_in_memory

    dtype = next(model.parameters()).dtype
    sp = plan_in_memory(model, plan.target, plan.bias_policy, dtype, steps, rms_plan=plan)
    source = model.state_dict()
    state = run_to_state_dict(sp, source)
    # Copied tensors are the model's own; they must not change while the model is overwritten below.
    live = {t.untyped_storage().data_ptr() for t in source.values()}
    state = {k: v.clone() if v.untyped_storage().data_ptr() in live else v for k, v in state.items()}
    if plan.untie and (steps is None or "untie_tied_readers" in steps):
        for reader, _ in plan.untie:  # give the reader its own weight before loading the folded one
            mod = model.get_submodule(reader)
            mod.weight = torch.nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
        mark_untied(model)
    with torch.no_grad():
        rebuild_structure(model, structure_section(plan, steps), {k: tuple(v.shape) for k, v in state.items()})
    model.to(dtype)
    _copy_into(model, state)


def _copy_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy each tensor into the model's parameter or buffer of that name (not ``load_state_dict``, whose
    hooks in transformers re-tie an untied head to its embedding)."""
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    missing = [k for k in own if k not in state and k in dict(model.named_parameters(remove_duplicate=False))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise RuntimeError(f"the rebuilt model does not match the converted tensors (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, t in state.items():
            if own[name].shape != t.shape:
                raise RuntimeError(f"{name}: the rebuilt model has shape {tuple(own[name].shape)}, the converted "
                                   f"tensor {tuple(t.shape)}")
            own[name].copy_(t)
