"""Give a model the structure of a ``PlacementSpec``: placed block classes, added norms, QK-norm and
embedding-norm hooks, DyT. New norms start at the identity gain (1) and zero shift; ``apply.py`` then
sets their values (copied, calibrated, folded or freshly initialised).

Module names (state-dict keys) of added norms, per block: ``post_norm1`` / ``post_norm2`` (attention /
MLP output norms, the names HyperCLOVAX uses for Peri-LN), ``resid_norm1`` / ``resid_norm2`` (norms after
the residual add: Post-LN, DeepNorm); per attention: ``q_norm``, ``k_norm``, ``v_norm`` (per head, as in
Qwen3); model: ``embed_norm`` next to the embedding table. Disabled input norms become ``nn.Identity``.

Scales (LNS 1/sqrt(l), DeepNorm alpha) are plain Python floats in the spec, never buffers: a buffer can
be wiped by ``to_empty`` (the OLMo-core LNS bug, PR #698).
"""
from __future__ import annotations

import copy

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.placement.family import Family, head_dim
from normsurgeon.placement.spec import BlockSpec, PlacementSpec, SublayerSpec

OUT = ("post_norm1", "post_norm2")
POST = ("resid_norm1", "resid_norm2")
_CLASSES: dict[tuple[type, str], type] = {}


def _sublayer(blk: torch.nn.Module, j: int, sub: SublayerSpec, x: torch.Tensor, f) -> torch.Tensor:
    """One sublayer of a placed block (equations in ``spec.py``); x: [b, T, d]."""
    h = getattr(blk, blk.ns_in_names[j])(x) if sub.in_norm else x
    if sub.scale != 1.0:
        h = h * sub.scale
    y = f(h)  # [b, T, d]
    if sub.out_norm:
        y = getattr(blk, OUT[j])(y)
    base = h if sub.residual_from_normed else x
    x = base + y if sub.residual_alpha == 1.0 else base * sub.residual_alpha + y
    if sub.post_norm:
        x = getattr(blk, POST[j])(x)
    return x


def _forward_llama(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                   use_cache=False, position_embeddings=None, **kwargs):
    spec: BlockSpec = self.ns_spec

    def attn(h):
        return self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)[0]

    x = _sublayer(self, 0, spec.attn, hidden_states, attn)
    return _sublayer(self, 1, spec.mlp, x, self.mlp)


def _forward_gpt2(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                  encoder_attention_mask=None, use_cache=False, **kwargs):
    spec: BlockSpec = self.ns_spec

    def attn(h):
        return self.attn(h, past_key_values=past_key_values, attention_mask=attention_mask, use_cache=use_cache,
                         **kwargs)[0]

    x = _sublayer(self, 0, spec.attn, hidden_states, attn)
    return _sublayer(self, 1, spec.mlp, x, self.mlp)


def placed_class(cls: type, fam: Family) -> type:
    key = (cls, fam.name)
    if key not in _CLASSES:
        fwd = _forward_llama if fam.name == "llama" else _forward_gpt2
        _CLASSES[key] = type(f"Placed{cls.__name__}", (cls,), {"forward": fwd, "__module__": __name__})
    return _CLASSES[key]


def _fresh(template: torch.nn.Module, size: int | None = None) -> torch.nn.Module:
    """A norm of the template's class and eps with gain 1 (and shift 0), optionally of another width."""
    n = copy.deepcopy(template)
    with torch.no_grad():
        for name, p in list(n.named_parameters(recurse=False)):
            shape = (size,) if size is not None else p.shape
            fill = 1.0 if name == "weight" else 0.0
            setattr(n, name, torch.nn.Parameter(torch.full(shape, fill, dtype=p.dtype, device=p.device)))
    if size is not None and hasattr(n, "normalized_shape"):
        n.normalized_shape = (size,)
    return n


def _dyt(template: torch.nn.Module, alpha0: float) -> torch.nn.Module:
    from normsurgeon.lnfree.dyt import DyT  # issue 4's module (read-only reuse)

    size = template.weight.shape[0]
    d = DyT(size, alpha0=alpha0, weight=True, bias=getattr(template, "bias", None) is not None)
    return d.to(template.weight.dtype)


def _norm_hook(mod, args, out):
    """Forward hook: apply the norm stored in ``mod.__dict__['_ns_norm']`` (per head if ``_ns_hd``)."""
    norm, hd = mod.__dict__["_ns_norm"], mod.__dict__.get("_ns_hd")
    if hd is None:
        return norm(out)
    shp = out.shape  # [b, T, heads*hd]
    return norm(out.view(*shp[:-1], shp[-1] // hd, hd)).view(shp)


def _attach(mod: torch.nn.Module, norm: torch.nn.Module, hd: int | None = None) -> None:
    mod.__dict__["_ns_norm"] = norm  # a reference, not a child: the norm's key stays where it is registered
    mod.__dict__["_ns_hd"] = hd
    mod.register_forward_hook(_norm_hook)


def install(model: torch.nn.Module, fam: Family, spec: PlacementSpec, alpha0: float = 0.5) -> None:
    """Rebuild ``model`` (a stock Pre-LN model of family ``fam``) with the structure of ``spec``."""
    blocks = fam.blocks(model)
    if len(spec.blocks) != len(blocks):
        raise UnsupportedModel(f"the spec has {len(spec.blocks)} blocks, the model {len(blocks)}")
    template = getattr(blocks[0], fam.in_norms[0])
    hd = head_dim(model, fam)
    for blk, bs in zip(blocks, spec.blocks):
        blk.__class__ = placed_class(type(blk), fam)
        blk.ns_spec, blk.ns_in_names = bs, fam.in_norms
        make = (lambda: _dyt(template, alpha0)) if bs.dyt else (lambda: _fresh(template))
        for j, sub in enumerate((bs.attn, bs.mlp)):
            if not sub.in_norm:
                setattr(blk, fam.in_norms[j], torch.nn.Identity())
            elif bs.dyt:
                setattr(blk, fam.in_norms[j], make())
            if sub.out_norm:
                setattr(blk, OUT[j], make())
            if sub.post_norm:
                setattr(blk, POST[j], make())
        _install_qk(blk, fam, bs, template, hd)
    if spec.embedding_norm:
        owner, _, _ = fam.final_norm.rpartition(".")
        norm = _fresh(template)
        setattr(model.get_submodule(owner), "embed_norm", norm)
        _attach(model.get_submodule(fam.embed_out), norm)
    if spec.final_dyt:
        owner, _, child = fam.final_norm.rpartition(".")
        setattr(model.get_submodule(owner), child, _dyt(model.get_submodule(fam.final_norm), alpha0))


def _install_qk(blk: torch.nn.Module, fam: Family, bs: BlockSpec, template, hd: int) -> None:
    attn = getattr(blk, fam.attn)
    native = isinstance(getattr(attn, "q_norm", None), torch.nn.Module) and not isinstance(attn.q_norm, torch.nn.Identity)
    if bs.qk_norm == "keep" or (bs.qk_norm == "qk" and native):
        return
    if bs.qk_norm == "none":
        if native:
            attn.q_norm, attn.k_norm = torch.nn.Identity(), torch.nn.Identity()
        return
    if fam.q is None:
        raise UnsupportedModel(f"{bs.qk_norm}-norm needs separate q/k/v projections; this {fam.name} model fuses "
                               f"them in one layer (`{fam.attn}.c_attn`), which `place` does not split")
    if native and bs.qk_norm == "qkv":
        raise UnsupportedModel("the model already has built-in q/k norms; adding a v norm to it is not supported")
    names = ("q", "k", "v") if bs.qk_norm == "qkv" else ("q", "k")
    for n in names:
        norm = _fresh(template, hd)
        setattr(attn, f"{n}_norm", norm)
        _attach(getattr(attn, getattr(fam, n)), norm, hd)
