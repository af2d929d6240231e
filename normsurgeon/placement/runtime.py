"""Give a model the structure of a ``PlacementSpec`` on its *anatomy* (``anatomy.py``): added norms,
replaced or removed input norms, residual rewrites, QK-norms, DyT. No block's ``forward`` is replaced, so
one implementation serves every Pre-LN family; everything is done with forward hooks on the modules the
anatomy names (the input norms, the writers, the q/k/v projections), held by small picklable objects
that ``copy.deepcopy`` copies along with the model. New norms start at the identity gain (1) and zero
shift; ``apply.py`` then sets their values (copied, calibrated, folded or freshly initialised).

How each part of a sublayer's equations (``spec.py``) is realised:

- ``in_norm`` off: the input norm becomes ``nn.Identity``; DyT: it becomes a ``DyT``; ``scale`` (LNS): a
  hook multiplies the norm's output by the Python float ``scale`` (never a buffer: the OLMo-core LNS
  ``to_empty`` bug, PR #698);
- ``out_norm``: a hook applies the added norm to the writer's output (``o_proj``/``c_proj``/``dense``/``fc2``...);
- a new residual (``post_norm``, ``residual_alpha``, ``residual_from_normed``, the embedding norm in front
  of block 0): the stream value ``x`` entering the sublayer is taken at its input norm, and the last
  writer of the group (one sublayer, or both of a parallel block) emits ``new - x - (the others)``, so
  that the block's own ``x + ...`` sum is ``new`` (one rounding of the stream; the anatomy checked that
  the block adds its writers' outputs with coefficient 1);
- QK(V)-norm: a hook on the projection normalises each head with an RMSNorm (the model's own class when
  its norms are RMSNorms), at per-head channel lists for a fused ``qkv``.

Module names (state-dict keys) of added norms, per block: ``post_norm1`` / ``post_norm2`` (attention /
MLP output norms, the names HyperCLOVAX uses for Peri-LN), ``resid_norm1`` / ``resid_norm2`` (norms after
the residual add: Post-LN, DeepNorm; ``resid_norm`` for a parallel block's one sum); on the attention
module: ``q_norm``, ``k_norm``, ``v_norm`` (per head, as in Qwen3); ``embed_norm`` on the module holding
the blocks.
"""
from __future__ import annotations

import copy

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.placement.anatomy import Anatomy, Block, Sublayer, first_tensor
from normsurgeon.placement.spec import BlockSpec, PlacementSpec, SublayerSpec

OUT = ("post_norm1", "post_norm2")
POST = ("resid_norm1", "resid_norm2")
PARALLEL_POST = "resid_norm"
EMBED_NORM = "embed_norm"


# -- hooks (module-level classes: picklable, deep-copied with the model) ----------------------------

class _Scale:
    """Forward hook: multiply a norm's output by a constant (LNS 1/sqrt(l))."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, mod, args, out):
        return out * self.scale


class _ApplyNorm:
    """Forward hook: pass a writer's output through an added norm (Peri-LN / output-only)."""

    def __init__(self, norm: torch.nn.Module):
        self.norm = norm

    def __call__(self, mod, args, out):
        return _with_first(out, self.norm(first_tensor(out)))


def _with_first(out, new: torch.Tensor):
    """``out`` with its (first) tensor replaced: MoE layers return (hidden, router logits)."""
    if isinstance(out, tuple):
        return (new,) + out[1:]
    if isinstance(out, list):
        return [new] + out[1:]
    return new


class _HeadNorm:
    """Forward hook on a projection: normalise each head of its output ([..., heads*hd] viewed per head)."""

    def __init__(self, norm: torch.nn.Module, hd: int):
        self.norm, self.hd = norm, int(hd)

    def __call__(self, mod, args, out):
        shp = out.shape  # [b, T, heads*hd]
        return self.norm(out.view(*shp[:-1], shp[-1] // self.hd, self.hd)).view(shp)


class _FusedHeadNorm:
    """Forward hook on a fused q/k/v projection: normalise the heads of each role at their channels."""

    def __init__(self, parts: list[tuple[torch.nn.Module, list[list[int]]]]):
        self.parts = [(norm, torch.tensor(heads, dtype=torch.long)) for norm, heads in parts]  # [heads, hd]

    def __call__(self, mod, args, out):
        new = out.clone()
        for norm, idx in self.parts:
            idx = idx.to(out.device)
            x = out[..., idx.reshape(-1)]  # [..., heads*hd]
            new[..., idx.reshape(-1)] = norm(x.view(*x.shape[:-1], *idx.shape)).reshape(x.shape)
        return new


class _Group:
    """The new residual of one group of sublayers that read one stream value ``x``."""

    def __init__(self, alpha: float, post: torch.nn.Module | None, from_normed: bool,
                 embed: torch.nn.Module | None):
        self.alpha, self.post, self.from_normed, self.embed = float(alpha), post, from_normed, embed
        self.x = self.base = self.h = None
        self.ys: list[torch.Tensor] = []

    def __getstate__(self):  # tensors of the last forward are not part of the model
        d = dict(self.__dict__)
        d.update(x=None, base=None, h=None, ys=[])
        return d

    def __deepcopy__(self, memo):
        new = _Group.__new__(_Group)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return new


class _Enter:
    """Forward pre-hook on a group's input norm: remember ``x``; with an embedding norm, feed N_e(x)."""

    def __init__(self, group: _Group, first: bool):
        self.group, self.first = group, first

    def __call__(self, mod, args):
        g = self.group
        if self.first:
            g.x, g.ys, g.h = args[0], [], None
            g.base = g.embed(g.x) if g.embed is not None else g.x
        if g.embed is not None:
            return (g.base,) + tuple(args[1:])
        return None


class _Normed:
    """Forward hook on an input norm (after its scale hook): remember h for ``residual_from_normed``."""

    def __init__(self, group: _Group):
        self.group = group

    def __call__(self, mod, args, out):
        self.group.h = out


class _Write:
    """Forward hook on a writer (after its output norm): the group's last writer emits ``new - x - others``."""

    def __init__(self, group: _Group, closer: bool):
        self.group, self.closer = group, closer

    def __call__(self, mod, args, out):
        g = self.group
        y = first_tensor(out)
        if not self.closer:
            g.ys.append(y)
            return None
        others = sum(g.ys) if g.ys else 0.0
        base = g.h if g.from_normed else g.base
        new = (base if g.alpha == 1.0 else base * g.alpha) + others + y
        if g.post is not None:
            new = g.post(new)
        g.ys = []
        return _with_first(out, new - g.x - others)


# -- building blocks ---------------------------------------------------------------------------------

def fresh_norm(template: torch.nn.Module, offset: float, weight_attr: str = "weight", size: int | None = None):
    """A norm of the template's class and eps with unit gain (``1 - offset`` stored) and zero shift,
    optionally of another width. Remembers its gain offset in ``ns_gain_offset``."""
    n = copy.deepcopy(template)
    with torch.no_grad():
        for name, p in list(n.named_parameters(recurse=False)):
            shape = (size,) if size is not None and p.dim() == 1 else p.shape
            fill = 1.0 - offset if name == weight_attr else 0.0
            setattr(n, name, torch.nn.Parameter(torch.full(shape, fill, dtype=p.dtype, device=p.device)))
    if size is not None and hasattr(n, "normalized_shape"):
        n.normalized_shape = (size,)
    n.ns_gain_offset = offset
    return n


def dyt_norm(template: torch.nn.Module, alpha0: float, size: int | None = None) -> torch.nn.Module:
    from normsurgeon.modules import DyT  # issue 4's module (normsurgeon.lnfree.dyt)

    p = next(template.parameters(), None)
    width = size or getattr(template, "normalized_shape", (None,))[0] or (p.shape[0] if p is not None else None)
    has_bias = getattr(template, "bias", None) is not None
    d = DyT(int(width), alpha0=alpha0, weight=True, bias=has_bias)
    d.ns_gain_offset = 0.0
    return d.to(p.dtype if p is not None else torch.get_default_dtype())


def gain_norm(kind, dtype: torch.dtype, device=None) -> torch.nn.Module:
    """A parameter-free norm (OLMo-1) as a stock norm with a unit gain, so that a gain can be set."""
    if kind.family == "layernorm":
        n = torch.nn.LayerNorm(kind.size, eps=kind.eps or 1e-5, elementwise_affine=True, bias=False)
    else:
        n = torch.nn.RMSNorm(kind.size, eps=kind.eps)
    n.ns_gain_offset = 0.0
    return n.to(dtype=dtype, device=device)


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    owner, _, child = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, child, new)
    return new


def _sub_spec(bs: BlockSpec, s: Sublayer) -> SublayerSpec:
    return bs.attn if s.kind == "attention" else bs.mlp


def rewrites(bs: BlockSpec, group: list[Sublayer]) -> bool:
    return any(_sub_spec(bs, s).post_norm or _sub_spec(bs, s).residual_alpha != 1.0
               or _sub_spec(bs, s).residual_from_normed for s in group)


def check(anatomy: Anatomy, spec: PlacementSpec) -> None:
    """Refuse, before anything is changed, a spec that this anatomy cannot hold (one line: why, where)."""
    if len(spec.blocks) != len(anatomy.blocks):
        raise UnsupportedModel(f"the spec has {len(spec.blocks)} blocks, the model {len(anatomy.blocks)}")
    for b, bs in zip(anatomy.blocks, spec.blocks):
        if b.parallel:
            a, m = bs.attn, bs.mlp
            if a.residual_from_normed or m.residual_from_normed:
                raise UnsupportedModel(f"{bs.label}: a residual taken after the FFN's norm needs a sequential block; "
                                       f"`{b.name}` is a parallel block (attention and MLP read the same stream value)")
            if (a.post_norm, a.residual_alpha) != (m.post_norm, m.residual_alpha):
                raise UnsupportedModel(f"{bs.label}: a parallel block (`{b.name}`) has one residual sum; its attention "
                                       f"and MLP cannot have different residual norms or weights")
        for n in b.norms:
            specs = {(s.in_norm, s.scale) for s in (_sub_spec(bs, x) for x in b.sublayers if x.norm == n)}
            if len(specs) > 1:
                raise UnsupportedModel(f"block {b.index}'s attention and MLP read one norm (`{n}`), and the spec "
                                       f"({bs.label}) treats their input norms differently")
        first = b.index == 0 and spec.embedding_norm
        for gi, group in enumerate(b.groups):
            if (rewrites(bs, group) or (first and gi == 0)) and not b.unit_residual:
                raise UnsupportedModel(f"{bs.label} rewrites the residual sum, but {b.residual_problem}")
        if bs.qk_norm in ("qk", "qkv"):
            _qk_plan(b, bs)


def _qk_plan(b: Block, bs: BlockSpec) -> tuple[str, ...]:
    """The roles that get an added per-head norm (empty: the native ones are kept)."""
    a = b.attention
    native = set(a.native_norms) if a is not None else set()
    if bs.qk_norm == "qk" and {"q", "k"} <= native:
        return ()
    if native and native != {"q", "k"}:
        raise UnsupportedModel(f"{bs.qk_norm}-norm: `{a.scope}` already has built-in norms on "
                               f"{'/'.join(r for r in ('q', 'k', 'v') if r in native)}; adding more is not supported")
    if a is None or a.problem is not None:
        raise UnsupportedModel(f"{bs.qk_norm}-norm needs the attention's q, k and v in block {b.index}: "
                               f"{a.problem if a is not None else 'no attention found'}")
    roles = ("v",) if native else ("q", "k", "v") if bs.qk_norm == "qkv" else ("q", "k")  # native q/k norms stay
    if a.fused and a.channels is None:
        raise UnsupportedModel(f"{bs.qk_norm}-norm: the fused q/k/v projection `{a.proj['q']}` could not be "
                               f"mapped to heads")
    return roles


# -- install -----------------------------------------------------------------------------------------

def install(model: torch.nn.Module, anatomy: Anatomy, spec: PlacementSpec, alpha0: float = 0.5) -> None:
    """Rebuild ``model`` (the stock Pre-LN model ``anatomy`` describes) with the structure of ``spec``."""
    check(anatomy, spec)
    tname = anatomy.blocks[0].attn.norm
    template = copy.deepcopy(model.get_submodule(tname))  # pristine: before any hook or replacement
    tkind = anatomy.norm_kinds[tname]
    t_off = anatomy.gain_offset(tname)
    p0 = next(model.parameters())
    if next(template.parameters(), None) is None:  # parameter-free norms: added norms get a gain
        template, t_off = gain_norm(tkind, p0.dtype, p0.device), 0.0
    wattr = tkind.weight_attr if hasattr(template, tkind.weight_attr) else "weight"

    def make(dyt: bool, size: int | None = None) -> torch.nn.Module:
        return dyt_norm(template, alpha0, size) if dyt else fresh_norm(template, t_off, wattr, size)

    def make_head(size: int) -> torch.nn.Module:
        """Per-head QK(V) norms are RMSNorms (Qwen3, OLMo2, HybridNorm): the model's own class if it is one."""
        if tkind.family in ("rmsnorm", "rmsnorm_offset"):
            return fresh_norm(template, t_off, wattr, size)
        n = torch.nn.RMSNorm(size, eps=tkind.eps if tkind.eps is not None else 1e-6)
        n.ns_gain_offset = 0.0
        return n.to(dtype=p0.dtype, device=p0.device)

    backbone = model.get_submodule(anatomy.backbone) if anatomy.backbone else model
    for b, bs in zip(anatomy.blocks, spec.blocks):
        blk = model.get_submodule(b.name)
        blk.ns_spec = bs
        norms: dict[str, torch.nn.Module] = {}
        for n in b.norms:  # input norms: removed, DyT, or kept (a parameter-free one gets a gain for LNS)
            s = _sub_spec(bs, next(x for x in b.sublayers if x.norm == n))
            mod = model.get_submodule(n)
            if not s.in_norm:
                mod = _replace(model, n, torch.nn.Identity())
            elif bs.dyt:
                mod = _replace(model, n, dyt_norm(mod if next(mod.parameters(), None) is not None else template,
                                                  alpha0, anatomy.norm_kinds[n].size))
            elif s.scale != 1.0 and next(mod.parameters(), None) is None and n in anatomy.odd_readers:
                # LNS on a parameter-free norm whose readers cannot take sqrt(l) either: give it a gain
                mod = _replace(model, n, gain_norm(anatomy.norm_kinds[n], p0.dtype, p0.device))
            if s.in_norm and s.scale != 1.0:
                mod.register_forward_hook(_Scale(s.scale))
            norms[n] = mod
        for s in b.sublayers:  # output norms on the writers
            if _sub_spec(bs, s).out_norm:
                norm = make(bs.dyt)
                setattr(blk, OUT[s.index], norm)
                model.get_submodule(s.output).register_forward_hook(_ApplyNorm(norm))
        for gi, group in enumerate(b.groups):  # new residual sums
            embed = spec.embedding_norm and b.index == 0 and gi == 0
            if not (rewrites(bs, group) or embed):
                continue
            last = _sub_spec(bs, group[-1])
            post = None
            if last.post_norm:
                post = make(bs.dyt)
                setattr(blk, PARALLEL_POST if b.parallel else POST[group[0].index], post)
            enorm = None
            if embed:
                enorm = fresh_norm(template, t_off, wattr)
                setattr(backbone, EMBED_NORM, enorm)
            g = _Group(last.residual_alpha, post, last.residual_from_normed, enorm)
            gnorms = list(dict.fromkeys(s.norm for s in sorted(group, key=lambda s: s.norm_order)))  # call order
            for k, n in enumerate(gnorms):
                norms[n].register_forward_pre_hook(_Enter(g, first=k == 0))
            if last.residual_from_normed:
                norms[group[-1].norm].register_forward_hook(_Normed(g))
            order = sorted(group, key=lambda s: s.order)
            for s in order:
                model.get_submodule(s.output).register_forward_hook(_Write(g, closer=s is order[-1]))
        _install_qk(model, b, bs, make_head)
    if spec.final_dyt:
        for n in [anatomy.final_norm] + anatomy.embedding_norms:
            mod = model.get_submodule(n)
            _replace(model, n, dyt_norm(mod if next(mod.parameters(), None) is not None else template, alpha0,
                                        anatomy.norm_kinds[n].size))


def _install_qk(model: torch.nn.Module, b: Block, bs: BlockSpec, make_head) -> None:
    a = b.attention
    if bs.qk_norm == "keep":
        return
    if bs.qk_norm == "none":
        for n in (a.native_norms.values() if a is not None else ()):
            _replace(model, n, torch.nn.Identity())
        return
    roles = _qk_plan(b, bs)
    if not roles:
        return
    scope = model.get_submodule(a.scope)
    added: dict[str, torch.nn.Module] = {}
    for role in roles:
        name = f"{role}_norm"
        if getattr(scope, name, None) is not None:
            raise UnsupportedModel(f"{bs.qk_norm}-norm: `{a.scope}` already has an attribute `{name}`")
        added[role] = make_head(a.head_dims[role])
        setattr(scope, name, added[role])
    by_proj: dict[str, list[str]] = {}
    for role in roles:
        by_proj.setdefault(a.proj[role], []).append(role)
    for proj, rs in by_proj.items():
        mod = model.get_submodule(proj)
        if a.layout(rs[0]) is None:
            mod.register_forward_hook(_HeadNorm(added[rs[0]], a.head_dims[rs[0]]))
        else:
            mod.register_forward_hook(_FusedHeadNorm([(added[r], a.layout(r)) for r in rs]))
