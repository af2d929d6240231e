"""``place``: rewrite a Pre-LN model in memory, either converting its trained weights (``mode="convert"``)
or initialising a fresh model for training from scratch (``mode="fresh"``).

Conversion rules (float64 math, cast once to the model's dtype):

- kept input norms keep their gain and shift; with LNS they are multiplied by sqrt(l) so that the
  fixed 1/sqrt(l) scale cancels them (exact up to round-off);
- an added output norm gets gain = mean token RMS of that sublayer's output on calibration data
  (``calibrate=False``: gain 1);
- a norm after a residual add (Post-LN, DeepNorm) takes the gain and shift of the source input norm of
  the sublayer it now feeds, when that sublayer has lost its own input norm, else the identity gain;
  when block 0's attention loses its input norm behind a Post-LN block, that norm moves onto the
  embeddings (BERT-style embedding norm);
- QK(V)-norm gains = mean per-head RMS of the projection; DyT alpha = 1/RMS(norm input), gain and shift
  kept.

>>> import torch, transformers as T
>>> from normsurgeon.placement.spec import build_spec
>>> m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=2)).eval()
>>> ids = torch.randint(0, 64, (2, 8))
>>> before = m(input_ids=ids).logits
>>> r = place(m, build_spec("lns", 2), calib_ids=ids)
>>> r.preservation["level"], bool((m(input_ids=ids).logits - before).abs().max() < 1e-5)
('exact', True)
"""
from __future__ import annotations

import dataclasses

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.placement.calibrate import Calibration, calibrate
from normsurgeon.placement.family import Family, family_of
from normsurgeon.placement.runtime import OUT, POST, install
from normsurgeon.placement.spec import PlacementSpec, preservation


@dataclasses.dataclass
class PlaceResult:
    family: str
    spec: PlacementSpec
    mode: str
    preservation: dict
    notes: list[str]
    calibration_tokens: int = 0


def check_source(model: torch.nn.Module, fam: Family) -> None:
    """Refuse anything but a stock Pre-LN model whose input norms feed the sublayers they are named for."""
    from normsurgeon.graph.normmap import build_norm_map

    blocks = fam.blocks(model)
    if any(hasattr(b, "ns_spec") for b in blocks):
        raise UnsupportedModel("this model was already placed; place from the original Pre-LN model instead")
    nm = build_norm_map(model)
    bad = [b.name for b in nm.blocks if b.name.startswith(fam.layers + ".") and b.placement != "pre-ln"]
    if bad:
        kinds = sorted({b.placement for b in nm.blocks if b.name in bad})
        raise UnsupportedModel(f"`place` converts Pre-LN models; {len(bad)} block(s) are {', '.join(kinds)} "
                               f"(e.g. {bad[0]})")
    for i in range(len(blocks)):
        for j, sub in enumerate((fam.attn, fam.mlp)):
            name = f"{fam.layers}.{i}.{fam.in_norms[j]}"
            info = nm.norm(name)
            inside = f"{fam.layers}.{i}.{sub}."
            if info.role != "pre" or not all(r.name.startswith(inside) for r in info.readers):
                raise UnsupportedModel(f"`{name}` does not feed `{inside[:-1]}` in the traced graph (role "
                                       f"{info.role}); this is not the {fam.name} layout `place` expects")


def _set(norm: torch.nn.Module, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         alpha: float | None = None) -> None:
    """Assign float64 values to a norm's parameters, cast once."""
    with torch.no_grad():
        if weight is not None and getattr(norm, "weight", None) is not None:
            norm.weight.copy_(weight.to(norm.weight.dtype))
        if bias is not None and getattr(norm, "bias", None) is not None:
            norm.bias.copy_(bias.to(norm.bias.dtype))
        if alpha is not None and hasattr(norm, "alpha"):
            norm.alpha.fill_(alpha)


def _params(norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = norm.weight.detach().to(torch.float64).clone()
    b = norm.bias.detach().to(torch.float64).clone() if getattr(norm, "bias", None) is not None else None
    return w, b


def place(model: torch.nn.Module, spec: PlacementSpec, *, mode: str = "convert", calib_ids: torch.Tensor | None = None,
          calibrate_gains: bool = True, alpha0: float = 0.5, deepnorm_beta: float | None = None) -> PlaceResult:
    """Rewrite ``model`` in place to ``spec``; see the module docstring for the conversion rules."""
    fam = family_of(model)
    notes: list[str] = []
    if mode == "convert":
        check_source(model, fam)
    blocks = fam.blocks(model)
    b0 = spec.blocks[0].attn
    if mode == "convert" and not b0.in_norm and b0.post_norm and not spec.embedding_norm:
        spec = spec.model_copy(update={"embedding_norm": True})
        notes.append("block 0's attention input norm moved onto the embeddings (BERT-style embedding norm)")
    src_in = [[_params(getattr(b, n)) for n in fam.in_norms] for b in blocks]
    src_final = _params(model.get_submodule(fam.final_norm))
    cal: Calibration | None = None
    needs_cal = mode == "convert" and calibrate_gains and calib_ids is not None and _needs_calibration(spec)
    if needs_cal:
        cal = calibrate(model, fam, calib_ids)
    install(model, fam, spec, alpha0=alpha0)
    if mode == "convert":
        _convert_params(model, fam, spec, src_in, src_final, cal, notes)
        if _needs_calibration(spec) and cal is None:
            notes.append("no calibration data: added norms start at gain 1 (DyT at alpha0)")
    else:
        _fresh_params(model, fam, spec, deepnorm_beta, notes)
    level = preservation(spec, calibrate=cal is not None)
    if mode == "fresh":
        level = {"level": "fresh initialisation (no source function)", "reasons": level["reasons"]}
    return PlaceResult(fam.name, spec, mode, level, notes, cal.tokens if cal else 0)


def _needs_calibration(spec: PlacementSpec) -> bool:
    return spec.final_dyt or any(b.dyt or b.attn.out_norm or b.mlp.out_norm or b.qk_norm in ("qk", "qkv")
                                 for b in spec.blocks)


def _convert_params(model, fam: Family, spec: PlacementSpec, src_in, src_final, cal: Calibration | None,
                    notes: list[str]) -> None:
    blocks = fam.blocks(model)
    L = len(blocks)
    subs = [(i, j) for i in range(L) for j in range(2)]  # sublayers in stream order
    for i, (blk, bs) in enumerate(zip(blocks, spec.blocks)):
        for j, sub in enumerate((bs.attn, bs.mlp)):
            w, b = src_in[i][j]
            if sub.in_norm:
                s = 1.0 / sub.scale  # LNS: fold sqrt(l) into gain and shift
                alpha = None
                if bs.dyt and cal is not None:
                    alpha = 1.0 / cal.norm_input_rms[f"{fam.layers}.{i}.{fam.in_norms[j]}"]
                _set(getattr(blk, fam.in_norms[j]), w * s, None if b is None else b * s, alpha)
            if sub.out_norm:
                g = cal.sublayer_rms[(i, j)] if cal is not None else 1.0
                _set(getattr(blk, OUT[j]), torch.full_like(w, g), None, 1.0 / g if bs.dyt else None)
            if sub.post_norm:
                k = subs.index((i, j)) + 1
                nxt = subs[k] if k < len(subs) else None
                nsub = None if nxt is None else (spec.blocks[nxt[0]].attn, spec.blocks[nxt[0]].mlp)[nxt[1]]
                if nsub is not None and not nsub.in_norm:
                    nw, nb = src_in[nxt[0]][nxt[1]]
                    _set(getattr(blk, POST[j]), nw, nb)
        if bs.qk_norm in ("qk", "qkv") and cal is not None:
            attn = getattr(blk, fam.attn)
            for n in ("q", "k", "v"):
                norm = getattr(attn, f"{n}_norm", None)
                if isinstance(norm, torch.nn.Module) and (i, n) in cal.head_rms and hasattr(norm, "weight"):
                    if "_ns_norm" in getattr(attn, getattr(fam, n)).__dict__:  # added here, not native
                        _set(norm, torch.full_like(norm.weight, cal.head_rms[(i, n)], dtype=torch.float64))
    if spec.embedding_norm:
        owner = model.get_submodule(fam.final_norm.rpartition(".")[0])
        if not spec.blocks[0].attn.in_norm:
            w, b = src_in[0][0]
            _set(owner.embed_norm, w, b)
    if spec.final_dyt:
        w, b = src_final
        alpha = 1.0 / cal.norm_input_rms[fam.final_norm] if cal is not None else None
        _set(model.get_submodule(fam.final_norm), w, b, alpha)


def _fresh_params(model, fam: Family, spec: PlacementSpec, beta: float | None, notes: list[str]) -> None:
    """From-scratch init: new norms at gain 1; DeepNorm divides v, out and FFN weights by (8L)^(1/4)."""
    blocks = fam.blocks(model)
    L = len(blocks)
    deep = [i for i, bs in enumerate(spec.blocks) if bs.attn.residual_alpha != 1.0 or bs.mlp.residual_alpha != 1.0]
    if not deep:
        return
    beta = beta if beta is not None else (8.0 * L) ** -0.25
    with torch.no_grad():
        for i in deep:
            blk = blocks[i]
            attn, mlp = getattr(blk, fam.attn), getattr(blk, fam.mlp)
            if fam.v is not None:
                getattr(attn, fam.v).weight.mul_(beta)
            else:  # GPT-2 c_attn (Conv1D, weight [d, 3d]): the value columns are the last third
                w = attn.c_attn.weight
                d = w.shape[1] // 3
                w[:, 2 * d:].mul_(beta)
            getattr(attn, fam.o).weight.mul_(beta)
            for name in fam.ffn_weights:
                getattr(mlp, name).weight.mul_(beta)
    notes.append(f"DeepNorm init: value, attention-output and FFN weights x beta = {beta:.4g} in {len(deep)} blocks")

