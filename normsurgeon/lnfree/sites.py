"""Where the norms to remove sit, and installing ``FixedScaleNorm`` there (with the q/k vs v split).

Norms come from the norm map (real dataflow): ``pre`` norms whose readers live in an attention module
are *attention* norms, other ``pre`` norms are *MLP* norms, ``final`` norms are final. An attention
norm is split into a q/k path and a value path when the value readers can be found:

- separate projections (OPT, Llama, GPT-J, ...): readers named ``v_proj``/``value``/``v``/``wv``;
  a forward pre-hook feeds them the value-path output;
- fused projections: GPT-2 ``c_attn`` (``[q | k | v]`` along the output) and GPT-NeoX
  ``query_key_value`` (per head ``[q_h | k_h | v_h]``); a forward hook recomputes the value columns
  from the value-path output.

Otherwise the attention norm has one path, removed at the q/k stage (the report says so).

An ``embedding`` norm (BLOOM's ``word_embeddings_layernorm``) that reads nothing but one table is
removed at install, exactly: the table's rows become their normalized values and the norm keeps only
its gain and shift (``bake_embedding``). A refusal is one line: each blocking structure with its count
and first place (the full list in the error's ``details``).

>>> import torch, transformers as T
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
>>> sites = install(m)
>>> [(s.name, s.role, s.block_index, s.split) for s in sites.sites][:3]
[('transformer.h.0.ln_2', 'mlp', 0, False), ('transformer.h.1.ln_2', 'mlp', 1, False), ('transformer.h.0.ln_1', 'attn', 0, True)]
"""
from __future__ import annotations

import dataclasses
import re

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.graph.layouts import layout_of
from normsurgeon.graph.normmap import NormMap, build_norm_map
from normsurgeon.lnfree.fake_norm import FAMILIES, FixedScaleNorm
from normsurgeon.module_tree import set_module

V_NAMES = {"v_proj", "value", "v", "wv", "v_lin", "v_linear"}
ROLES = ("embedding", "mlp", "attn", "final")


@dataclasses.dataclass
class Site:
    name: str
    role: str  # "mlp" | "attn" | "final" | "embedding" (baked into its table at install)
    block_index: int  # position of its block (final norms: number of blocks; embedding norms: -1)
    family: str
    readers: list[tuple[str, str]]  # (module name, layout); an embedding norm: [(table, "embedding")]
    split: bool = False  # attention norm with a separate value path
    note: str = ""
    # Why the fixed scale cannot be folded into the readers (a reader that is not a linear layer, an
    # output that reaches fused expert weights): from the norm map's ``keep_affine``. No native form then.
    unfoldable: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Sites:
    """The installed norms (``model`` holds ``FixedScaleNorm`` modules at ``sites[i].name``)."""

    model: torch.nn.Module
    sites: list[Site]
    norm_map: NormMap
    handles: list = dataclasses.field(default_factory=list)

    def module(self, name: str) -> FixedScaleNorm:
        return self.model.get_submodule(name)

    def by_role(self, role: str) -> list[Site]:
        return [s for s in self.sites if s.role == role]

    def all_fake(self) -> bool:
        return all(self.module(s.name).fake_main and (self.module(s.name).fake_v or not s.split) for s in self.sites)

    def sigmas(self) -> dict[str, float]:
        return {s.name: float(self.module(s.name).sigma) for s in self.sites}

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _is_attention(model: torch.nn.Module, reader: str) -> bool:
    parts = reader.split(".")
    for i in range(len(parts) - 1, 0, -1):
        cls = type(model.get_submodule(".".join(parts[:i]))).__name__.lower()
        if "attention" in cls or "attn" in cls:
            return True
    return False


def _block_index(name: str, block: str | None) -> int:
    if block:
        m = re.search(r"(\d+)$", block)
        if m:
            return int(m.group(1))
    return -1


def _fused_v_mask(model: torch.nn.Module, reader: str) -> torch.Tensor | None:
    """Boolean mask over a fused q/k/v projection's output features that feed the values."""
    mod = model.get_submodule(reader)
    parent = type(model.get_submodule(reader.rpartition(".")[0])).__name__
    width = mod.weight.shape[1] if layout_of(mod) == "conv1d" else mod.weight.shape[0]
    idx = torch.arange(width)
    if parent == "GPT2Attention" and width % 3 == 0:
        return idx >= 2 * width // 3  # [q | k | v]
    if parent == "GPTNeoXAttention":
        heads = model.config.num_attention_heads
        hs = width // (3 * heads)
        return (idx % (3 * hs)) >= 2 * hs  # per head [q_h | k_h | v_h]
    return None


_REFUSAL_KINDS = {  # norm-map role -> how a refusal names it (counts per kind, first place)
    "post": "Post-LN: {n} norm{s} normalize{vs} the residual stream itself",
    "output": "{n} norm{s} normalize{vs} a sublayer's output before it is added (Peri-LN / sandwich)",
    "embedding": "{n} embedding norm{s} read{vs} more than one table (or not a table), so cannot be baked",
    "family": "{n} norm{s} {are} not LayerNorm / RMSNorm",
    "calls": "{n} norm{s} {are} called more than once per forward pass",
}


def _refusal(problems: dict[str, list[str]], stream: list[str], no_pre: bool) -> str:
    """One line: each cause with its count and first place (the full list goes in the error's details).

    >>> _refusal({"post": ["h.0.ln_1", "h.0.ln_2"]}, [], True)
    'cannot remove the norms: Post-LN: 2 norms normalize the residual stream itself, first `h.0.ln_1`'
    """
    parts = []
    for kind, names in problems.items():
        if names:
            n = len(names)
            text = _REFUSAL_KINDS[kind].format(n=n, s="s" if n > 1 else "", vs="" if n > 1 else "s",
                                               are="are" if n > 1 else "is")
            parts.append(f"{text}, first `{names[0]}`")
    if stream and not parts:  # a stream read without a norm (Post-LN models have these too: named above)
        more = f" (+{len(stream) - 1} more)" if len(stream) > 1 else ""
        parts.append(f"the traced residual stream is incomplete: {stream[0]}{more}")
    if no_pre and not parts:
        parts.append("no Pre-LN norm was found")
    line = "cannot remove the norms: " + "; ".join(parts)
    return line if len(line) <= 320 else line[:319] + "…"


def _bakeable(nm: NormMap, n) -> bool:
    """An embedding norm reads exactly one table and nothing else: its output is a function of the row."""
    return len(n.stream_writers) == 1 and n.stream_writers[0] in nm.embedding_tables


def find_sites(model: torch.nn.Module, nm: NormMap | None = None) -> tuple[list[Site], NormMap]:
    """Classify every residual norm of a Pre-LN model; refuse what the method cannot handle.

    Roles come from the norm map: a ``pre`` norm (or a ``final`` one inside a block: an MoE layer's
    input norm, whose output reaches the stream only through expert weights the trace cannot follow) is
    an attention or MLP norm by its readers; a ``final`` norm outside every block is final; an
    ``embedding`` norm that reads one table is baked into it (``install``).
    """
    nm = nm if nm is not None else build_norm_map(model)
    problems: dict[str, list[str]] = {k: [] for k in _REFUSAL_KINDS}
    for n in nm.residual_norms:
        if n.role not in ("pre", "final", "embedding"):
            problems[n.role if n.role in problems else "post"].append(n.name)
        elif n.role == "embedding" and not _bakeable(nm, n):
            problems["embedding"].append(n.name)
        elif n.kind.family not in FAMILIES:
            problems["family"].append(n.name)
        elif n.calls > 1:
            problems["calls"].append(n.name)
    no_pre = not nm.by_role("pre")
    # A raw stream read means the trace lost the stream somewhere (MoE expert kernels it cannot follow):
    # norms past that point would be taken for inner norms and silently kept.
    stream = list(nm.stream_problems)
    if no_pre or stream or any(problems.values()):
        details = {"reasons": [f"{k}: `{name}`" for k, names in problems.items() for name in names] + stream
                   + (["no Pre-LN norm was found"] if no_pre else [])}
        raise UnsupportedModel(_refusal(problems, stream, no_pre), details)
    sites = []
    n_blocks = len(nm.blocks)
    for n in nm.by_role("embedding", "pre", "final"):
        readers = [(r.name, r.layout or "none") for r in n.readers]
        if n.role == "embedding":
            role, readers = "embedding", [(n.stream_writers[0], "embedding")]  # the table it is baked into
        elif n.role == "final" and n.block is None:
            role = "final"
        else:
            role = "attn" if any(_is_attention(model, r) for r, _ in readers) else "mlp"
        idx = n_blocks if role == "final" else -1 if role == "embedding" else _block_index(n.name, n.block)
        unfoldable = [] if role == "embedding" else list(n.keep_affine)
        sites.append(Site(n.name, role, idx, n.kind.family, readers, unfoldable=unfoldable))
    order = {r: i for i, r in enumerate(ROLES)}
    sites.sort(key=lambda s: (order[s.role], s.block_index, s.name))
    return sites, nm


def install(model: torch.nn.Module, *, mode: str = "fixed", momentum: float = 0.9, split_qkv: bool = True,
            dyt_alpha0: float | None = 0.5, nm: NormMap | None = None) -> Sites:
    """Replace every removable norm by a live ``FixedScaleNorm`` (same function until a path goes fake).

    An embedding norm (BLOOM's ``word_embeddings_layernorm``) is removed here, exactly: its table's rows
    are replaced by their normalized values (the table is untied from a head that shares it first), and
    the norm becomes a fixed-scale norm with scale 1, fake from the start (``bake_embedding``).
    """
    sites, nm = find_sites(model, nm)
    kinds = {n.name: n.kind for n in nm.norms}
    out = Sites(model, sites, nm)
    for s in sites:
        old = model.get_submodule(s.name)
        k = kinds[s.name]
        new = FixedScaleNorm.from_module(old, k.family, k.eps if k.eps is not None else 0.0, k.weight_attr,
                                         k.bias_attr, mode="fixed" if s.role == "embedding" else mode,
                                         momentum=momentum, dyt_alpha0=dyt_alpha0, gain_offset=k.gain_offset)
        p = next(old.parameters(), None)
        if p is not None:
            new.to(p.device)
        set_module(model, s.name, new)
        if s.role == "embedding":
            bake_embedding(model, s, new)
        elif s.role == "attn" and split_qkv:
            _route_values(out, s, new)
        elif s.role == "attn":
            s.note = "q/k/v split disabled: the whole norm is removed at the q/k stage"
    return out


def _shared(model: torch.nn.Module, param: torch.Tensor, owner: str) -> bool:
    """Whether a module other than ``owner`` holds ``param`` (a tied embedding / head)."""
    for name, mod in model.named_modules():
        if name != owner and any(p is param for p in mod.parameters(recurse=False)):
            return True
    return False


@torch.no_grad()
def bake_embedding(model: torch.nn.Module, site: Site, norm: FixedScaleNorm) -> None:
    """Table rows -> their normalized values; the norm keeps its gain and shift, fake with scale 1.

    Exact: the norm reads nothing but the row (``find_sites`` checked), the normalized rows are centred
    (LayerNorm) with unit scale, so ``(row - mean) / 1 * g + b`` is what the norm computed. A head tied
    to the table keeps the original rows (``tie_word_embeddings`` becomes false).
    """
    table_name = site.readers[0][0]
    table = model.get_submodule(table_name)
    w = table.weight
    if _shared(model, w, table_name):
        from normsurgeon.transforms.apply import mark_untied

        mark_untied(model)
        site.note = f"`{table_name}` was untied from the head that shared it"
    table.weight = torch.nn.Parameter(norm.normalize(w.detach().double()).to(w.dtype), requires_grad=w.requires_grad)
    norm.sigma_ema.fill_(1.0)
    norm.set_fake(True, True)  # freezes sigma = 1
    site.note = (site.note + "; " if site.note else "") + f"baked into `{table_name}` (rows normalized, scale 1)"


def _route_values(sites: Sites, s: Site, norm: FixedScaleNorm) -> None:
    model = sites.model
    attn_readers = [(r, lay) for r, lay in s.readers if _is_attention(model, r)]
    separate = [(r, lay) for r, lay in attn_readers if r.rsplit(".", 1)[-1] in V_NAMES]
    fused = {r: _fused_v_mask(model, r) for r, lay in attn_readers if not separate}
    fused = {r: m for r, m in fused.items() if m is not None}
    if not separate and not fused:
        s.note = "value readers not identified: the whole norm is removed at the q/k stage"
        return
    s.split = norm.split_v = True
    # The hooks read the norm from an attribute of the reader (not a closure), so a deep copy of the
    # model routes to its own copy of the norm.
    for r, _ in separate:
        mod = model.get_submodule(r)
        object.__setattr__(mod, "_lnfree_norm", norm)  # a plain reference, not a registered submodule
        sites.handles.append(mod.register_forward_pre_hook(_feed_values))
    for r, mask in fused.items():
        mod = model.get_submodule(r)
        object.__setattr__(mod, "_lnfree_norm", norm)
        mod._lnfree_vmask = mask  # [out] bool
        sites.handles.append(mod.register_forward_hook(_recompute_values))


def _feed_values(module: torch.nn.Module, args: tuple):
    """Forward pre-hook on a separate value projection: read the value-path output instead."""
    v_in = module._lnfree_norm.v_output
    return None if v_in is None else (v_in,) + tuple(args[1:])


def _recompute_values(module: torch.nn.Module, args: tuple, output: torch.Tensor):
    """Forward hook on a fused q/k/v projection: take the value columns from the value-path output."""
    v_in = module._lnfree_norm.v_output
    if v_in is None:
        return None
    w, b = module.weight, getattr(module, "bias", None)
    if layout_of(module) == "conv1d":  # weight [in, out]
        v_out = v_in @ w if b is None else v_in @ w + b  # [..., out]
    else:  # linear weight [out, in]
        v_out = torch.nn.functional.linear(v_in, w, b)  # [..., out]
    return torch.where(module._lnfree_vmask.to(output.device), v_out, output)  # v columns from the v path
