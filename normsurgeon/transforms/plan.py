"""The conversion plan: what Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm will do to each tensor, and why not.

``plan_rms_conversion`` reads a ``NormMap`` and either returns a ``RmsPlan`` (every action named) or
raises ``UnsupportedModel`` listing each structure that blocks an exact conversion.

>>> import torch, transformers as T
>>> from normsurgeon.graph.normmap import build_norm_map
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
>>> plan = plan_rms_conversion(m, build_norm_map(m), "rmsnorm")
>>> plan.untie
[('lm_head', 'transformer.wte')]
"""
from __future__ import annotations

import dataclasses

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.graph.normmap import NormMap
from normsurgeon.transforms.refusals import Refusal, summarize

TARGETS = ("rmsnorm", "crmsnorm")
BIAS_POLICIES = ("stock", "fold-all")


@dataclasses.dataclass
class Fold:
    norm: str
    readers: list[tuple[str, str]]  # (module name, layout)
    fold_gain: bool
    fold_shift: bool
    reason: str = ""  # why the shift stays on the norm, if it does
    weight_attr: str = "weight"
    bias_attr: str = "bias"
    gain_offset: float = 0.0  # the gain is weight + gain_offset; a folded norm's weight becomes 1 - gain_offset


@dataclasses.dataclass
class RmsPlan:
    target: str
    bias_policy: str
    hidden_size: int
    untie: list[tuple[str, str]]  # (reader module whose weight is cloned, writer it was tied to)
    bake: list[tuple[str, str]]  # (embedding norm, embedding table it is baked into)
    center: list[tuple[str, str]]  # (writer name, kind)
    folds: list[Fold]
    replace: dict[str, float]  # norm name -> eps
    created_bias: list[str]
    kept_shift: list[str]
    kept_gain: list[str]
    notes: list[str]
    layer_scales: dict[str, str] = dataclasses.field(default_factory=dict)  # writer -> its layer-scale param
    recentre: list[str] = dataclasses.field(default_factory=list)  # embedding norms over several tables

    @property
    def stock_loadable(self) -> bool:
        """Whether the stock Hugging Face class can hold every tensor of the result."""
        return self.target == "rmsnorm" and not self.bake and not self.created_bias and not self.recentre

    @property
    def gain_offsets(self) -> dict[str, float]:
        """Norms whose stored weight means a (1 + w) gain (kept that way in the output)."""
        return {f.norm: f.gain_offset for f in self.folds if f.gain_offset}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stock_loadable"] = self.stock_loadable
        return d


def refusal_reasons(nm: NormMap, target: str) -> list[Refusal]:
    """Every structure that prevents an exact Pre-LN -> Pre-RMSNorm conversion (empty when none), in the
    order found, each tagged with its kind and place (``refusals.summarize`` makes the one-line error)."""
    reasons: list[Refusal] = []
    res = nm.residual_norms
    if not res:
        if nm.opaque_terms:
            return [Refusal(f"the residual stream cannot be followed: it adds {nm.opaque_terms[0]}, not a layer "
                            "or a parameter (computed at run time, or non-linear), which cannot be centred" +
                            (f" ({len(nm.opaque_terms)} such terms)" if len(nm.opaque_terms) > 1 else ""),
                            "no-stream")]
        return [Refusal("no norm on the residual stream was found", "no-stream")]
    fams = {n.kind.family for n in res}
    if fams <= {"rmsnorm", "rmsnorm_offset"}:
        kinds = sorted({n.kind.class_name for n in res})
        offset = " (offset (1+w) gains)" if "rmsnorm_offset" in fams else ""
        return [Refusal(f"the model already uses RMSNorm{offset} ({', '.join(kinds)}): nothing to convert; "
                        "centering an RMSNorm model's residual is not function-preserving", "already-rms")]
    for n in res:
        if n.kind.family != "layernorm":
            reasons.append(Refusal(f"`{n.name}` is a {n.kind.family} ({n.kind.class_name}) mixed with LayerNorms",
                                   "mixed", n.name))
        if n.kind.eps is None:
            reasons.append(Refusal(f"`{n.name}` ({n.kind.class_name}) has no readable epsilon", "eps", n.name))
        if n.role == "post":
            with_ = ", ".join(f"`{w}`" for w in n.summed_with[:3])
            positions = bool(n.summed_with) and all(w in nm.embedding_tables for w in n.summed_with)
            reasons.append(Refusal(
                f"Post-LN: `{n.name}` normalizes the residual stream itself (its output is the stream, added to "
                f"{with_ or 'later terms'}), so its centering cannot be moved into the weights"
                + (" (or positions are added after the norm)" if positions else ""),
                "post-positions" if positions else "post", n.name))
        elif n.role == "output":
            reasons.append(Refusal(f"`{n.name}` normalizes a sublayer output before it is added to the residual "
                                   "(Peri-LN/sandwich): its centering cannot be moved into the weights", "output",
                                   n.name))
        elif n.role == "embedding" and not _bakeable(nm, n.name) and (target == "crmsnorm" or n.kind.eps is None):
            reasons.append(Refusal(f"embedding norm `{n.name}` reads more than one table (positions added before "
                                   "it), so it cannot be baked into a table (Pre-CRMSNorm)", "embedding", n.name))
        elif n.role in ("pre", "final"):
            reasons.extend(Refusal(f"`{n.name}`: {p}", "norm", n.name) for p in n.problems)
            if target == "crmsnorm":  # the d -> d-1 shrink must reach every reader
                reasons.extend(Refusal(f"`{n.name}`: {p} (Pre-CRMSNorm shrinks every reader)", "norm", n.name)
                               for p in n.keep_affine)
        if n.calls > 1:
            reasons.append(Refusal(f"`{n.name}` is called {n.calls} times in one forward pass", "calls", n.name))
    reasons.extend(Refusal(p, "stream", _quoted(p, 1)) for p in nm.stream_problems)
    if nm.other_norm_ops:
        reasons.append(Refusal("functional norm calls outside any module (" + ", ".join(nm.other_norm_ops) +
                               "): the map cannot see what they normalize", "functional"))
    for w in nm.writers:
        if w.kind in ("buffer", "other"):
            reasons.append(Refusal(f"residual writer `{w.name}` is a {w.kind} that cannot be rewritten in the "
                                   "checkpoint", "writer", w.name))
        elif w.kind == "norm" and not any(n.name == w.name and n.role == "embedding" for n in res):
            reasons.append(Refusal(f"the output of norm `{w.name}` is added to the residual stream", "norm-writer",
                                   w.name))
        elif w.kind != "norm" and nm.hidden_size is not None and w.width != nm.hidden_size:
            reasons.append(Refusal(f"residual writer `{w.name}` writes {w.width} features, not {nm.hidden_size}",
                                   "width", w.name))
    if not nm.by_role("pre"):
        reasons.append(Refusal("no Pre-LN norm was found (no norm reads the residual stream before a block)", "no-pre"))
    if target == "crmsnorm":
        reasons.extend(Refusal(f"residual writer `{w.name}` is a stack of expert weights: Pre-CRMSNorm cannot shrink "
                               "it yet", "writer", w.name) for w in nm.writers if w.kind.startswith("param:"))
        for n in nm.by_role("final"):
            if n.reads_output:
                reasons.append(Refusal(f"`{n.name}`'s output is a model output; Pre-CRMSNorm would change its width",
                                       "crms-output", n.name))
    return list(dict.fromkeys(reasons))


def _tied_to_writers(model: torch.nn.Module, writer_params: dict[int, str], done: set[str]) -> list[tuple[str, str]]:
    """Modules other than the writers (``done``: the writers and those already untied) that share a
    writer's weight (a tied decoder behind an MLM head transform, which reads an inner norm, not the
    residual stream): centring the writer must not move them, so they are untied too."""
    found = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter) and id(w) in writer_params and name not in done:
            found.append((name, writer_params[id(w)]))
    return found


def _quoted(text: str, i: int) -> str:
    """The ``i``-th back-quoted name in ``text`` (0-based), or ''."""
    parts = text.split("`")
    return parts[2 * i + 1] if len(parts) > 2 * i + 1 else ""


def _bakeable(nm: NormMap, norm_name: str) -> bool:
    """An embedding norm can be baked when it reads exactly one table and nothing else."""
    n = nm.norm(norm_name)
    return len(n.stream_writers) == 1 and n.stream_writers[0] in nm.embedding_tables


def decide_fold(norm: str, readers: list[tuple[str, str]], reads_output: bool, has_shift: bool,
                missing: list[str], policy: str, attrs: dict[str, str]) -> tuple[Fold, list[str]]:
    """What happens to one pre/final norm's gain and shift; returns the Fold and the biases it creates.

    ``missing``: readers without a bias; ``has_shift``: the norm has a non-zero shift. Shared by the
    in-memory plan and the streaming plan (which learns ``has_shift`` from the checkpoint).

    >>> f, made = decide_fold("ln_f", [("lm_head", "linear")], False, True, ["lm_head"], "stock", {})
    >>> f.fold_gain, made
    (False, [])
    """
    if not (bool(readers) and not reads_output):
        return Fold(norm, readers, False, False, "its output is a model output", **attrs), []
    if has_shift and missing and policy == "stock":
        # A shift kept on the norm sits after the gain, so the gain must stay there too.
        reason = (f"{', '.join(f'`{m}`' for m in missing)} has no bias in the stock class; gain and shift "
                  "stay on the RMSNorm (use --bias-policy fold-all to create the biases)")
        return Fold(norm, readers, False, False, reason, **attrs), []
    return Fold(norm, readers, True, has_shift, **attrs), (list(missing) if has_shift else [])


def plan_rms_conversion(model: torch.nn.Module, nm: NormMap, target: str, bias_policy: str = "stock") -> RmsPlan:
    """Plan the exact conversion, or raise UnsupportedModel naming every blocking structure."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}")
    reasons = refusal_reasons(nm, target)
    if reasons:
        raise UnsupportedModel(summarize(nm.model_class, target, reasons), {"reasons": list(reasons)})
    modules = dict(model.named_modules())
    policy = "fold-all" if target == "crmsnorm" else bias_policy
    notes: list[str] = []
    bake = [(n.name, n.stream_writers[0]) for n in nm.by_role("embedding") if _bakeable(nm, n.name)]
    # an embedding norm over several tables centres its own output (modules.CentredLayerNorm)
    recentre = [n.name for n in nm.by_role("embedding") if not _bakeable(nm, n.name)]
    center = []
    for w in nm.writers:
        if w.kind == "norm" and w.name in recentre:
            continue
        if w.kind == "norm":
            center.append((dict(bake)[w.name], "embedding"))
        else:
            center.append((w.name, w.kind))

    writer_params = {}
    for name, kind in center:
        if not kind.startswith("param"):
            writer_params[id(modules[name].weight)] = name
    seen_readers: dict[str, str] = {}
    folds, untie, created, kept_shift, kept_gain = [], [], [], [], []
    for n in nm.by_role("pre", "final"):
        readers = [(r.name, r.layout) for r in n.readers]
        attrs = {"weight_attr": n.kind.weight_attr, "bias_attr": n.kind.bias_attr, "gain_offset": n.kind.gain_offset}
        if n.keep_affine:  # exact on the centred stream with the affine where it is
            folds.append(Fold(n.name, readers, False, False, f"{n.keep_affine[0]}; gain and shift stay on the "
                              "RMSNorm", **attrs))
            kept_gain.append(n.name)
            if n.kind.has_bias and getattr(modules[n.name], n.kind.bias_attr, None) is not None:
                kept_shift.append(n.name)
            continue
        for r, _ in readers:
            if r in seen_readers:
                raise UnsupportedModel(f"`{r}` reads both `{seen_readers[r]}` and `{n.name}`")
            seen_readers[r] = n.name
            tied_to = writer_params.get(id(modules[r].weight))
            if tied_to is not None:
                untie.append((r, tied_to))
        shift = getattr(modules[n.name], n.kind.bias_attr, None) if n.kind.has_bias else None
        has_shift = shift is not None and bool(torch.any(shift != 0))
        missing = [r.name for r in n.readers if not r.has_bias]
        fold, made = decide_fold(n.name, readers, n.reads_output, has_shift, missing, policy, attrs)
        folds.append(fold)
        created.extend(made)
        if not fold.fold_gain:
            kept_gain.append(n.name)
            if has_shift:
                kept_shift.append(n.name)
    untie += _tied_to_writers(model, writer_params, {r for r, _ in untie} | {name for name, _ in center})
    replace = {n.name: float(n.kind.eps) for n in nm.by_role("pre", "final")}
    if untie:
        extra = sum(modules[r].weight.numel() for r, _ in untie)
        notes.append(f"untied {', '.join(r for r, _ in untie)} from the embedding: +{extra:,} parameters")
    scales = {w.name: w.scale for w in nm.writers if w.scale is not None}
    if scales:
        notes.append(f"folded {len(scales)} layer scale(s) into their writers (the scales become 1)")
    if recentre:
        notes.append(f"{len(recentre)} embedding norm(s) over several tables centre their output "
                     f"(CentredLayerNorm; load with normsurgeon.load): {', '.join(recentre)}")
    return RmsPlan(target, policy, int(nm.hidden_size), untie, bake, center, folds, replace, created,
                   kept_shift, kept_gain, notes, scales, recentre)
