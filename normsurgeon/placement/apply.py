"""``place``: rewrite a Pre-LN model in memory, either converting its trained weights (``mode="convert"``)
or initialising a fresh model for training from scratch (``mode="fresh"``). Any Pre-LN / Pre-RMSNorm
decoder whose anatomy ``anatomy.find_anatomy`` reads from the dataflow: sequential or parallel blocks,
separate or fused q/k/v projections, offset (``1 + w``) gains.

Conversion rules (float64 math, cast once to the model's dtype; gains are *effective* gains, so a
Gemma-style ``1 + w`` norm stores ``gain - 1``):

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

from normsurgeon.placement.anatomy import Anatomy, find_anatomy
from normsurgeon.placement.calibrate import Calibration, calibrate
from normsurgeon.placement.runtime import EMBED_NORM, OUT, PARALLEL_POST, POST, check, install
from normsurgeon.placement.spec import PlacementSpec, preservation


@dataclasses.dataclass
class PlaceResult:
    family: str  # the source's model_type (for reports; nothing is looked up by it)
    spec: PlacementSpec
    mode: str
    preservation: dict
    notes: list[str]
    calibration_tokens: int = 0
    anatomy: str = ""  # one-line summary of what was found


def _offset(mod: torch.nn.Module, anatomy: Anatomy, name: str | None) -> float:
    off = getattr(mod, "ns_gain_offset", None)
    if off is not None:
        return float(off)
    return anatomy.gain_offset(name) if name in anatomy.norm_kinds else 0.0


def _affine(mod: torch.nn.Module, anatomy: Anatomy, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(effective gain, shift) of a source norm in float64 (None where it has no such parameter)."""
    kind = anatomy.norm_kinds[name]
    w = getattr(mod, kind.weight_attr, None)
    b = getattr(mod, kind.bias_attr, None)
    if isinstance(w, torch.Tensor):
        g = w.detach().to(torch.float64) + anatomy.gain_offset(name)
    else:  # parameter-free (OLMo-1): unit gain
        g = torch.ones(kind.size, dtype=torch.float64) if kind.size else None
    s = b.detach().to(torch.float64).clone() if isinstance(b, torch.Tensor) else None
    return g, s


def _set(mod: torch.nn.Module, anatomy: Anatomy, name: str | None, gain=None, shift=None, alpha=None,
         fill: float | None = None) -> None:
    """Set a norm's effective gain (tensor, or ``fill`` for every channel), shift and DyT alpha."""
    kind = anatomy.norm_kinds.get(name) if name else None
    wattr = kind.weight_attr if kind is not None and hasattr(mod, kind.weight_attr) else "weight"
    battr = kind.bias_attr if kind is not None and hasattr(mod, kind.bias_attr) else "bias"
    off = _offset(mod, anatomy, name)
    with torch.no_grad():
        w = getattr(mod, wattr, None)
        if isinstance(w, torch.Tensor):
            if fill is not None:
                w.fill_(fill - off)
            elif gain is not None:
                w.copy_((gain - off).to(w.dtype))
        b = getattr(mod, battr, None)
        if isinstance(b, torch.Tensor) and shift is not None:
            b.copy_(shift.to(b.dtype))
        if alpha is not None and isinstance(getattr(mod, "alpha", None), torch.Tensor):
            mod.alpha.fill_(alpha)


def place(model: torch.nn.Module, spec: PlacementSpec, *, mode: str = "convert", calib_ids: torch.Tensor | None = None,
          calibrate_gains: bool = True, alpha0: float = 0.5, deepnorm_beta: float | None = None,
          anatomy: Anatomy | None = None) -> PlaceResult:
    """Rewrite ``model`` in place to ``spec``; see the module docstring for the conversion rules."""
    an = anatomy if anatomy is not None else find_anatomy(model)
    notes: list[str] = []
    b0 = spec.blocks[0].attn if spec.blocks else None
    if mode == "convert" and b0 is not None and not b0.in_norm and b0.post_norm and not spec.embedding_norm:
        spec = spec.model_copy(update={"embedding_norm": True})
        notes.append("block 0's attention input norm moved onto the embeddings (BERT-style embedding norm)")
    check(an, spec)  # refusals before anything is changed
    native = [b.index for b, bs in zip(an.blocks, spec.blocks) if bs.qk_norm == "qk" and b.attention is not None
              and {"q", "k"} <= set(b.attention.native_norms)]
    if native:  # the model's own q/k norms are what was asked for: nothing changes there
        blocks = [bs.model_copy(update={"qk_norm": "keep"}) if i in native else bs for i, bs in enumerate(spec.blocks)]
        spec = spec.model_copy(update={"blocks": blocks})
        notes.append(f"{len(native)} block(s) already normalise q and k (first `{an.blocks[native[0]].attention.scope}`): kept")
    src = {}
    for n in {n for b in an.blocks for n in b.norms} | {an.final_norm} | set(an.embedding_norms):
        src[n] = _affine(model.get_submodule(n), an, n)
    reader_fold = _reader_folds(model, an, spec, notes) if mode == "convert" else set()
    cal: Calibration | None = None
    needs_cal = mode == "convert" and calibrate_gains and calib_ids is not None and _needs_calibration(spec)
    if needs_cal:
        cal = calibrate(model, an, calib_ids)
    install(model, an, spec, alpha0=alpha0)
    _dropout_note(an, spec, notes)
    if mode == "convert":
        _convert_params(model, an, spec, src, cal, notes, reader_fold)
        if _needs_calibration(spec) and cal is None:
            notes.append("no calibration data: added norms start at gain 1 (DyT at alpha0)")
    else:
        _fresh_params(model, an, spec, deepnorm_beta, notes)
    level = preservation(spec, calibrate=cal is not None)
    if mode == "fresh":
        level = {"level": "fresh initialisation (no source function)", "reasons": level["reasons"]}
    return PlaceResult(an.model_type, spec, mode, level, notes, cal.tokens if cal else 0, an.summary())


def _dropout_note(an: Anatomy, spec: PlacementSpec, notes: list[str]) -> None:
    """Residual rewrites emit ``new - x`` at a writer; a dropout after it (training mode) drops part of that."""
    from normsurgeon.placement.runtime import rewrites

    hit = [s for b, bs in zip(an.blocks, spec.blocks) for gi, g in enumerate(b.groups)
           if rewrites(bs, g) or (spec.embedding_norm and b.index == 0 and gi == 0) for s in g if s.dropout > 0]
    if hit:
        notes.append(f"in training mode the residual dropout after {len(hit)} rewritten sublayer(s) (p={hit[0].dropout:g}, "
                     f"first `{hit[0].writer}`) drops part of the new residual sum; set it to 0 before training "
                     f"(evaluation is unaffected)")


def _needs_calibration(spec: PlacementSpec) -> bool:
    return spec.final_dyt or any(b.dyt or b.attn.out_norm or b.mlp.out_norm or b.qk_norm in ("qk", "qkv")
                                 for b in spec.blocks)


@torch.no_grad()
def _gain_fold_exact(mod: torch.nn.Module, an: Anatomy, name: str, factor: float) -> bool:
    """Whether ``norm(x)`` with its gain and shift times ``factor`` equals ``factor * norm(x)`` in float64 (not
    so for a norm that applies its gain in float32, as Gemma's RMSNorm does)."""
    import copy

    if not isinstance(getattr(mod, an.norm_kinds[name].weight_attr, None), torch.Tensor):
        return False  # parameter-free (OLMo-1): nothing to fold into
    probe = copy.deepcopy(mod).to(torch.float64)
    g, sh = _affine(probe, an, name)
    x = torch.randn(4, g.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 0.3
    ref = probe(x) * factor
    _set(probe, an, name, g * factor, None if sh is None else sh * factor)
    return bool(((probe(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) < 1e-14)


def _reader_folds(model, an: Anatomy, spec: PlacementSpec, notes: list[str]) -> set[str]:
    """Input norms whose LNS factor goes into their readers' weights instead of their gain (exactness)."""
    out: set[str] = set()
    for b, bs in zip(an.blocks, spec.blocks):
        if bs.dyt:
            continue
        for s in b.sublayers:
            sub = bs.attn if s.kind == "attention" else bs.mlp
            if not sub.in_norm or sub.scale == 1.0 or s.norm in out or s.norm in an.odd_readers:
                continue
            if not _gain_fold_exact(model.get_submodule(s.norm), an, s.norm, 1.0 / sub.scale):
                out.add(s.norm)
    if out:
        first = sorted(out)[0]
        notes.append(f"{len(out)} input norm(s) have no gain or apply it below float64 precision (first "
                     f"`{first}`): sqrt(l) is folded into the linear layers that read them instead (exact)")
    return out


def _convert_params(model, an: Anatomy, spec: PlacementSpec, src, cal: Calibration | None, notes: list[str],
                    reader_fold: set[str] = frozenset()) -> None:
    groups = [(b, g) for b in an.blocks for g in b.groups]  # in stream order
    done: set[str] = set()
    for k, (b, group) in enumerate(groups):
        bs = spec.blocks[b.index]
        blk = model.get_submodule(b.name)
        for s in group:
            sub = bs.attn if s.kind == "attention" else bs.mlp
            if sub.in_norm and s.norm not in done:
                done.add(s.norm)
                g, sh = src[s.norm]
                f = 1.0 / sub.scale  # LNS: fold sqrt(l) into gain and shift (or into the readers)
                alpha = 1.0 / cal.norm_input_rms[s.norm] if bs.dyt and cal is not None else None
                if s.norm in reader_fold:
                    with torch.no_grad():
                        for r in an.norm_readers[s.norm]:
                            w = model.get_submodule(r).weight
                            w.copy_((w.detach().to(torch.float64) * f).to(w.dtype))
                    f = 1.0
                _set(model.get_submodule(s.norm), an, s.norm, None if g is None else g * f,
                     None if sh is None else sh * f, alpha)
            if sub.out_norm:
                rms = cal.sublayer_rms[(b.index, s.index)] if cal is not None else 1.0
                _set(getattr(blk, OUT[s.index]), an, None, fill=rms, alpha=1.0 / rms if bs.dyt else None)
        last = bs.attn if group[-1].kind == "attention" else bs.mlp
        if last.post_norm and k + 1 < len(groups):
            nb, ngroup = groups[k + 1]
            nsub = spec.blocks[nb.index].attn if ngroup[0].kind == "attention" else spec.blocks[nb.index].mlp
            if not nsub.in_norm:
                g, sh = src[ngroup[0].norm]
                post = getattr(blk, PARALLEL_POST if b.parallel else POST[group[0].index])
                _set(post, an, None, g, sh)
                if len({s.norm for s in ngroup}) > 1:
                    notes.append(f"`{nb.name}` read the stream through two norms; the Post-LN norm before it takes "
                                 f"the attention's (`{ngroup[0].norm}`)")
        if bs.qk_norm in ("qk", "qkv") and cal is not None and b.attention is not None:
            scope = model.get_submodule(b.attention.scope)
            for role in ("q", "k", "v"):
                norm = getattr(scope, f"{role}_norm", None)
                if (b.index, role) in cal.head_rms and getattr(norm, "ns_gain_offset", None) is not None:
                    _set(norm, an, None, fill=cal.head_rms[(b.index, role)])  # added here, not native
    if spec.embedding_norm and not spec.blocks[0].attn.in_norm:
        owner = model.get_submodule(an.backbone) if an.backbone else model
        g, sh = src[an.blocks[0].attn.norm]
        _set(getattr(owner, EMBED_NORM), an, None, g, sh)
    if spec.final_dyt:
        for n in [an.final_norm] + an.embedding_norms:
            g, sh = src[n]
            alpha = 1.0 / cal.norm_input_rms[n] if cal is not None else None
            _set(model.get_submodule(n), an, None, g, sh, alpha)


def _scale_rows(mod: torch.nn.Module, beta: float, channels: list[int] | None = None) -> None:
    """Multiply a linear layer's weights (all outputs, or the given output channels) by ``beta``."""
    from normsurgeon.graph.layouts import layout_of

    w = mod.weight
    if channels is None:
        w.mul_(beta)
        return
    idx = torch.tensor(channels, dtype=torch.long, device=w.device)
    if layout_of(mod) == "conv1d":  # [in, out]
        w[:, idx] *= beta
    else:  # [out, in]
        w[idx] *= beta


def _fresh_params(model, an: Anatomy, spec: PlacementSpec, beta: float | None, notes: list[str]) -> None:
    """From-scratch init: new norms at gain 1; DeepNorm divides v, out and FFN weights by (8L)^(1/4)."""
    L = len(an.blocks)
    deep = [i for i, bs in enumerate(spec.blocks) if bs.attn.residual_alpha != 1.0 or bs.mlp.residual_alpha != 1.0]
    if not deep:
        return
    beta = beta if beta is not None else (8.0 * L) ** -0.25
    skipped = 0
    with torch.no_grad():
        for i in deep:
            b = an.blocks[i]
            a = b.attention
            if a is not None and "v" in a.proj and (not a.fused or a.channels is not None):
                lay = a.layout("v")
                _scale_rows(model.get_submodule(a.proj["v"]), beta, None if lay is None else [c for h in lay for c in h])
            else:
                skipped += 1
            _scale_rows(model.get_submodule(b.attn.output), beta)
            for name in b.mlp.modules:
                _scale_rows(model.get_submodule(name), beta)
            for name in b.mlp.experts:  # stacked expert weights (MoE)
                model.get_parameter(name).mul_(beta)
    notes.append(f"DeepNorm init: value, attention-output and FFN weights x beta = {beta:.4g} in {len(deep)} blocks")
    if skipped:
        notes.append(f"DeepNorm init: the value projection of {skipped} block(s) could not be told apart "
                     f"from q/k; its weights were left as they are")
