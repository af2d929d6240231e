"""What a rotation of the residual stream must rewrite, derived from the conversion plan and the norm map
(the traced dataflow), or why it cannot be done exactly.

After the conversion (``transforms``) every pre/final norm reads a stream it normalises by its RMS (a
Pre-LN model's stream is centred; an RMSNorm model's is not, and needs no centring), with unit gain.
Then for any orthogonal Q, ``RMS(x Q) = RMS(x)``: rotating every writer's output side and every reader's
input side leaves the function unchanged (computational invariance, SliceGPT / QuaRot).

Exactly rotatable needs, beyond a convertible model: every reader of a normalised stream is a linear
layer (``linear`` / ``conv1d``) of width d, every writer a layer or parameter of width d, no raw-stream
read, no norm output returned as a model output, and a norm gain that is either folded or foldable here
(a gain kept on the norm because its readers lack a bias slot is folded by the rotation, its shift
divided by the gain and then moved through Q). Anything else raises ``UnsupportedModel`` with the reason.

>>> import torch, transformers as T
>>> from normsurgeon.graph.normmap import build_norm_map
>>> from normsurgeon.transforms.plan import plan_rms_conversion
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
>>> nm = build_norm_map(m)
>>> rp = plan_rotation(m, nm, plan_rms_conversion(m, nm, "rmsnorm"))
>>> len(rp.writers), len(rp.readers), rp.mean_preserving
(4, 3, True)
"""
from __future__ import annotations

import dataclasses

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.graph.normmap import NormMap
from normsurgeon.transforms.plan import RmsPlan

ROTATABLE_WRITERS = ("linear", "conv1d", "conv", "embedding", "param")
ROTATABLE_READERS = ("linear", "conv1d")


@dataclasses.dataclass
class RotationPlan:
    hidden_size: int
    source_family: str  # "layernorm": a converted Pre-LN model (zero-mean stream); "rmsnorm"
    writers: list[tuple[str, str]]  # (module or parameter name, layout): output side x -> x Q
    readers: list[tuple[str, str]]  # (module name, layout): input side absorbs Q
    norms: dict[str, tuple[str, str, float]]  # pre/final norm -> (weight attr, bias attr, gain offset) after conversion
    gain_folds: dict[str, list[tuple[str, str]]]  # norms whose kept gain the rotation folds -> their readers
    layer_scales: dict[str, str]  # writer -> layer-scale parameter still to fold into it (RMSNorm sources)
    mean_preserving: bool  # Q must keep 1 fixed (a converted Pre-LN model whose norms assume a zero-mean stream)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _refuse(model_class: str, reason: str, more: int = 0) -> UnsupportedModel:
    tail = f" (and {more} more such places)" if more else ""
    return UnsupportedModel(f"cannot rotate {model_class} exactly: {reason}{tail}"[:400])


def plan_rotation(model: torch.nn.Module, nm: NormMap, plan: RmsPlan) -> RotationPlan:
    """The rotation of ``model`` (before the conversion ``plan`` is applied), or UnsupportedModel."""
    cls = nm.model_class
    if plan.target != "rmsnorm":
        raise _refuse(cls, f"rotation rewrites the Pre-RMSNorm form (--to rmsnorm), not {plan.target}")
    if plan.recentre:
        raise _refuse(cls, f"embedding norm `{plan.recentre[0]}` reads several tables and writes the stream "
                           "through its own gain (CentredLayerNorm), which Q cannot pass", len(plan.recentre) - 1)
    problems = list(nm.stream_problems)
    if problems:
        raise _refuse(cls, problems[0] + ": that reader would need Q too", len(problems) - 1)
    if nm.opaque_terms:
        raise _refuse(cls, f"the residual stream adds {nm.opaque_terms[0]}, which cannot be rotated")
    d = plan.hidden_size
    by_name = {w.name: w for w in nm.writers}
    writers = plan.writers or plan.center
    for name, kind in writers:
        base = "param" if kind.startswith("param") else kind
        if base not in ROTATABLE_WRITERS:
            raise _refuse(cls, f"residual writer `{name}` is a {kind}, which cannot be rotated in the checkpoint")
        w = by_name.get(name)
        if w is not None and w.kind != "norm" and w.width is not None and w.width != d:
            raise _refuse(cls, f"residual writer `{name}` writes {w.width} features, not {d}")
    infos = {n.name: n for n in nm.by_role("pre", "final")}
    readers: list[tuple[str, str]] = []
    norms: dict[str, tuple[str, str, float]] = {}
    gain_folds: dict[str, list[tuple[str, str]]] = {}
    notes: list[str] = []
    converted_ln = plan.source_family == "layernorm"
    for f in plan.folds:
        info = infos[f.norm]
        if info.reads_output:
            raise _refuse(cls, f"the output of `{f.norm}` is a model output: rotating the stream would rotate it")
        if info.keep_affine:
            raise _refuse(cls, f"`{f.norm}`: {info.keep_affine[0]}, so its reader cannot absorb Q")
        for r in info.readers:
            if r.layout not in ROTATABLE_READERS or (r.in_features is not None and r.in_features != d):
                raise _refuse(cls, f"`{r.name}` reads `{f.norm}` but is not a linear layer of width {d}")
        readers.extend((r, lay) for r, lay in f.readers)
        # after the conversion a replaced norm is normsurgeon's RMSNorm with weight/bias
        attrs = ("weight", "bias", f.gain_offset) if converted_ln and f.norm in plan.replace \
            else (f.weight_attr, f.bias_attr, f.gain_offset)
        norms[f.norm] = attrs
        module = model.get_submodule(f.norm)
        has_gain = getattr(module, f.weight_attr, None) is not None
        if not f.fold_gain and has_gain:
            gain_folds[f.norm] = list(f.readers)
    if gain_folds:
        notes.append(f"{len(gain_folds)} norm gain(s) kept by the conversion (readers without a bias slot) are "
                     "folded here; their shift becomes shift/gain on the norm and then shift Q")
    # an RMSNorm source's layer scales were not folded by the conversion (nothing is centred): fold them here
    scales = {w.name: w.scale for w in nm.writers if w.scale is not None} if plan.source_family == "rmsnorm" else {}
    return RotationPlan(d, plan.source_family, list(writers), readers, norms, gain_folds, scales,
                        mean_preserving=converted_ln, notes=notes)
