"""The conversion plan: what Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm will do to each tensor, and why not.

``plan_rms_conversion`` reads a ``NormMap`` and either returns a ``RmsPlan`` (every action named) or
raises ``UnsupportedModel`` listing each structure that blocks an exact conversion.

A model that already normalises its residual stream with RMSNorm (Llama, Qwen, Mistral; Gemma's ``(1+w)``
norms) is not centred (that would change its function): its plan folds every pre/final norm's gain into the
readers, leaving unit-gain ("weightless") RMSNorms of the stock class (Gemma: ``w = 0``), so the result
loads in stock transformers. ``RmsPlan.source_family`` says which kind of plan it is.

>>> import torch, transformers as T
>>> from normsurgeon.graph.normmap import build_norm_map
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
>>> plan = plan_rms_conversion(m, build_norm_map(m), "rmsnorm")
>>> plan.untie
[('lm_head', 'transformer.wte')]
>>> llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)).eval()
>>> rp = plan_rms_conversion(llama, build_norm_map(llama), "rmsnorm")
>>> rp.source_family, rp.center, [f.norm for f in rp.folds if f.fold_gain], rp.untie, rp.stock_loadable
('rmsnorm', [], ['model.layers.0.input_layernorm', 'model.layers.0.post_attention_layernorm', 'model.norm'], [('lm_head', 'model.embed_tokens')], True)
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
    # "layernorm": Pre-LN source (writers centred, norms replaced); "rmsnorm": the source already uses RMSNorm
    # (gains folded into readers only: nothing centred, the norms stay the stock class with unit gain)
    source_family: str = "layernorm"
    # every residual writer (name, kind), centred or not: what a rotation of the stream must rewrite
    writers: list[tuple[str, str]] = dataclasses.field(default_factory=list)

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
    if is_rms_source(nm):
        return rms_refusal_reasons(nm, target)
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


def is_rms_source(nm: NormMap) -> bool:
    """Every norm on the residual stream is an RMSNorm (gain w or (1+w)): the model is already Pre-RMSNorm."""
    fams = {n.kind.family for n in nm.residual_norms}
    return bool(fams) and fams <= {"rmsnorm", "rmsnorm_offset"}


def rms_refusal_reasons(nm: NormMap, target: str) -> list[Refusal]:
    """What blocks folding an RMSNorm model's gains into its readers. Nothing is centred, so the writers
    and the raw-stream reads do not matter; only norms whose gain acts on the stream itself (Post-LN,
    Peri-LN output norms, embedding norms), norms called twice and Pre-CRMSNorm (which needs a zero-mean
    stream) do."""
    res = nm.residual_norms
    if target == "crmsnorm":
        kinds = sorted({n.kind.class_name for n in res})
        return [Refusal(f"the model already uses RMSNorm ({', '.join(kinds)}): Pre-CRMSNorm needs a zero-mean "
                        "residual stream, and centring an RMSNorm model's stream is not function-preserving "
                        "(use --to rmsnorm to fold the gains)", "already-rms")]
    reasons: list[Refusal] = []
    for n in res:
        if n.role == "post":
            reasons.append(Refusal(f"Post-LN: `{n.name}` normalizes the residual stream itself (its output is the "
                                   "stream), so its gain cannot be moved into the weights", "post", n.name))
        elif n.role == "output":
            reasons.append(Refusal(f"`{n.name}` normalizes a sublayer output before it is added to the residual "
                                   "(Peri-LN/sandwich): its gain cannot be moved into the weights", "output", n.name))
        elif n.role == "embedding":
            reasons.append(Refusal(f"`{n.name}` is an RMSNorm on the embeddings: its gain writes the residual "
                                   "stream and cannot be moved into the weights", "embedding-gain", n.name))
        elif n.role in ("pre", "final"):
            reasons.extend(Refusal(f"`{n.name}`: {p}", "norm", n.name) for p in n.problems)
        if n.calls > 1:
            reasons.append(Refusal(f"`{n.name}` is called {n.calls} times in one forward pass", "calls", n.name))
    if nm.other_norm_ops:
        reasons.append(Refusal("functional norm calls outside any module (" + ", ".join(nm.other_norm_ops) +
                               "): the map cannot see what they normalize", "functional"))
    if not nm.by_role("pre"):
        reasons.append(Refusal("no Pre-LN norm was found (no norm reads the residual stream before a block)", "no-pre"))
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
    if is_rms_source(nm):
        return _plan_rms_fold(model, nm, target, bias_policy)
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
            _claim_reader(r, n.name, seen_readers)
            tied_to = writer_params.get(id(modules[r].weight))
            if tied_to is not None:
                untie.append((r, tied_to))
        shift = getattr(modules[n.name], n.kind.bias_attr, None) if n.kind.has_bias else None
        has_shift = shift is not None and bool(torch.any(shift != 0))
        _decide(n, readers, has_shift, policy, attrs, folds, created, kept_gain, kept_shift)
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
                   kept_shift, kept_gain, notes, scales, recentre, "layernorm", list(center))


def _owners(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(weight) -> the modules whose ``weight`` it is (more than one when tied)."""
    found: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter):
            found.setdefault(id(w), []).append(name)
    return found


def _plan_rms_fold(model: torch.nn.Module, nm: NormMap, target: str, bias_policy: str) -> RmsPlan:
    """An RMSNorm model: fold each pre/final norm's gain (``w`` or ``1 + w``) into its readers.

    Nothing is centred and no norm is replaced: the stock norm keeps computing RMSNorm with unit gain
    (``w := 1``, Gemma ``w := 0``), which is exact whatever the stream's mean. A reader whose weight is
    shared with another module (a head tied to the embedding) is untied first."""
    modules = dict(model.named_modules())
    owners = _owners(model)
    writers = [(w.name, w.kind) for w in nm.writers]
    seen_readers: dict[str, str] = {}
    folds, untie, created, kept_shift, kept_gain, notes = [], [], [], [], [], []
    for n in nm.by_role("pre", "final"):
        readers = [(r.name, r.layout) for r in n.readers]
        offset = 1.0 if n.kind.family == "rmsnorm_offset" else n.kind.gain_offset
        attrs = {"weight_attr": n.kind.weight_attr, "bias_attr": n.kind.bias_attr, "gain_offset": offset}
        shift = getattr(modules[n.name], n.kind.bias_attr, None) if n.kind.has_bias else None
        has_shift = shift is not None and bool(torch.any(shift != 0))
        weight = getattr(modules[n.name], n.kind.weight_attr, None) if n.kind.has_weight else None
        if weight is None:  # a weightless RMSNorm: nothing to fold
            folds.append(Fold(n.name, readers, False, False, "the norm has no gain", **attrs))
            continue
        if n.keep_affine:  # the gain stays on the (unchanged) norm: still exact
            folds.append(Fold(n.name, readers, False, False, f"{n.keep_affine[0]}; the gain stays on the norm",
                              **attrs))
            kept_gain.append(n.name)
            if has_shift:
                kept_shift.append(n.name)
            continue
        for r, _ in readers:
            _claim_reader(r, n.name, seen_readers)
            others = [o for o in owners.get(id(modules[r].weight), []) if o != r]
            if others:
                untie.append((r, others[0]))
        _decide(n, readers, has_shift, bias_policy, attrs, folds, created, kept_gain, kept_shift)
    if untie:
        extra = sum(modules[r].weight.numel() for r, _ in untie)
        notes.append(f"untied {', '.join(r for r, _ in untie)} from {untie[0][1]}: +{extra:,} parameters")
    folded = sum(f.fold_gain for f in folds)
    notes.append(f"the model already uses RMSNorm: folded {folded} gain(s) into their readers (unit-gain norms of "
                 "the stock class); nothing centred")
    # layer scales stay as they are (nothing is centred; a rotation of the stream folds them itself)
    return RmsPlan(target, bias_policy, int(nm.hidden_size), untie, [], [], folds, {}, created, kept_shift,
                   kept_gain, notes, {}, [], "rmsnorm", writers)


def _decide(n, readers: list[tuple[str, str]], has_shift: bool, policy: str, attrs: dict, folds: list,
            created: list, kept_gain: list, kept_shift: list) -> None:
    """Decide one norm's fold (``decide_fold``) and record it: the fold, the biases it creates, what it keeps."""
    missing = [r.name for r in n.readers if not r.has_bias]
    fold, made = decide_fold(n.name, readers, n.reads_output, has_shift, missing, policy, attrs)
    folds.append(fold)
    created.extend(made)
    if not fold.fold_gain:
        kept_gain.append(n.name)
        if has_shift:
            kept_shift.append(n.name)


def _claim_reader(reader: str, norm: str, seen: dict[str, str]) -> None:
    """Record that ``norm`` is what ``reader`` reads; a reader of two norms cannot take both folds."""
    if reader in seen:
        raise UnsupportedModel(f"`{reader}` reads both `{seen[reader]}` and `{norm}`")
    seen[reader] = norm
