"""Carry out a ``RotationPlan`` with an orthogonal Q on a converted float64 model, in place.

Order: fold the layer scales that an RMSNorm source still has into their writers; fold the gains the
conversion kept on a norm into its readers (the shift becomes shift/gain); rotate every writer's output
side and every reader's input side (``tensors.py``); move each norm's shift through Q. A parameter
shared by two modules (a tied head) is rotated once, and only when both want the same change.

>>> import torch, transformers as T
>>> from normsurgeon.graph.normmap import build_norm_map
>>> from normsurgeon.transforms.apply import apply_rms_plan
>>> from normsurgeon.transforms.plan import plan_rms_conversion
>>> from normsurgeon.rotation.orthogonal import mean_preserving_random
>>> from normsurgeon.rotation.plan import plan_rotation
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval().double()
>>> ids = torch.randint(0, 64, (1, 6)); ref = m(ids).logits.log_softmax(-1)
>>> nm = build_norm_map(m); plan = plan_rms_conversion(m, nm, "rmsnorm"); rp = plan_rotation(m, nm, plan)
>>> apply_rms_plan(m, plan); rotate_model(m, rp, mean_preserving_random(16, seed=1))
>>> bool((m(ids).logits.log_softmax(-1) - ref).abs().max() < 1e-10)
True
"""
from __future__ import annotations

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.rotation.tensors import residual_axis, rotate_reader, rotate_shift, rotate_writer
from normsurgeon.transforms.primitives import fold_scale_into_writer

MIN_RELATIVE_GAIN = 1e-6  # a kept gain this close to 0 cannot carry its shift (shift / gain)


def _check(q: torch.Tensor, d: int) -> None:
    if q.dtype != torch.float64 or tuple(q.shape) != (d, d):
        raise ValueError(f"Q must be float64 [{d}, {d}], not {q.dtype} {tuple(q.shape)}")


def fold_kept_gains(model: torch.nn.Module, rplan) -> None:
    """y = n g + beta  ->  (n + beta / g) with readers W diag(g): unit gain, exact, before rotating."""
    for norm_name, readers in rplan.gain_folds.items():
        norm = model.get_submodule(norm_name)
        w_attr, b_attr, offset = rplan.norms[norm_name]
        weight, bias = getattr(norm, w_attr), getattr(norm, b_attr, None)
        gain = weight.detach() + offset  # [d]
        if isinstance(bias, torch.Tensor) and bool(torch.any(bias != 0)):
            if gain.abs().min() <= MIN_RELATIVE_GAIN * gain.abs().max():
                raise UnsupportedModel(f"`{norm_name}` keeps a shift behind a gain with a zero entry: the shift cannot "
                                       "be moved past the gain, so the stream cannot be rotated exactly")
            bias.copy_(bias.detach() / gain)
        for r, layout in readers:
            mod = model.get_submodule(r)
            g = gain[None, :] if layout == "linear" else gain[:, None]  # scale the input axis
            mod.weight.copy_(mod.weight.detach() * g)
        weight.fill_(1.0 - offset)


def fold_rms_gains(model: torch.nn.Module, plan) -> None:
    """An RMSNorm source's conversion (``plan.source_family == "rmsnorm"``) done here, in place: untie the
    readers the plan names, fold each folded norm's gain (``w`` or ``1 + w``) and shift into its readers,
    leave the norm with unit gain (``w := 1 - offset``). The same arithmetic as the conversion's fold step."""
    from normsurgeon.transforms.primitives import fold_affine_into_reader

    with torch.no_grad():
        for reader, _ in plan.untie:
            mod = model.get_submodule(reader)
            mod.weight = torch.nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
        if plan.untie and getattr(model, "config", None) is not None:
            model.config.tie_word_embeddings = False
            text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
            if text is not None:
                text.tie_word_embeddings = False
        for f in plan.folds:
            if not f.fold_gain:
                continue
            norm = model.get_submodule(f.norm)
            weight, bias = getattr(norm, f.weight_attr), getattr(norm, f.bias_attr, None)
            gain = weight.detach() + f.gain_offset
            shift = bias.detach().clone() if f.fold_shift and isinstance(bias, torch.Tensor) else None
            for reader, layout in f.readers:
                fold_affine_into_reader(model.get_submodule(reader), layout, gain, shift, create_bias=f.fold_shift)
            weight.fill_(1.0 - f.gain_offset)
            if shift is not None:
                bias.zero_()


def _owned(model: torch.nn.Module, name: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter | None]:
    params = dict(model.named_parameters(remove_duplicate=False))
    if name in params:  # a bare parameter writer
        return params[name], None
    mod = model.get_submodule(name)
    bias = getattr(mod, "bias", None)
    return mod.weight, bias if isinstance(bias, torch.Tensor) else None


def rotate_model(model: torch.nn.Module, rplan, q: torch.Tensor) -> None:
    """Rotate the converted float64 ``model``'s residual stream by ``q`` (x -> x Q), in place."""
    _check(q, rplan.hidden_size)
    done: dict[int, list[tuple[str, int]]] = {}  # id(weight) -> (module, axis Q was applied to), each time
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        for writer, scale in rplan.layer_scales.items():
            mod = model.get_submodule(writer)
            layout = next(k for n, k in rplan.writers if n == writer)
            fold_scale_into_writer(mod.weight, getattr(mod, "bias", None), layout, params[scale].detach())
            params[scale].fill_(1.0)
        fold_kept_gains(model, rplan)
        for side, items in (("writer", rplan.writers), ("reader", rplan.readers)):
            op = rotate_writer if side == "writer" else rotate_reader
            for name, layout in items:
                w, b = _owned(model, name)
                axis = residual_axis(layout, side) % w.dim()
                seen = done.setdefault(id(w), [])
                tied = [a for n, a in seen if n != name]  # the same tensor rotated through another module
                if tied and axis not in tied:
                    raise UnsupportedModel(f"`{name}` shares its weight with a module that needs another rotation "
                                           "(untie it first)")
                w2, b2 = op(w.detach(), b.detach() if b is not None else None, layout, q)
                if not tied:
                    w.copy_(w2)
                    seen.append((name, axis))
                if b is not None and b2 is not b:
                    b.copy_(b2)
        for norm_name, (w_attr, b_attr, offset) in rplan.norms.items():
            norm = model.get_submodule(norm_name)
            weight, bias = getattr(norm, w_attr, None), getattr(norm, b_attr, None)
            if isinstance(weight, torch.Tensor) and bool(torch.any(weight.detach() + offset != 1.0)):
                raise UnsupportedModel(f"`{norm_name}` still has a gain after the conversion: the stream cannot be "
                                       "rotated past it")
            if isinstance(bias, torch.Tensor):
                bias.copy_(rotate_shift(bias.detach(), q))
