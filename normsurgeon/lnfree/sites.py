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
ROLES = ("mlp", "attn", "final")


@dataclasses.dataclass
class Site:
    name: str
    role: str  # "mlp" | "attn" | "final"
    block_index: int  # position of its block (final norms: number of blocks)
    family: str
    readers: list[tuple[str, str]]  # (module name, layout)
    split: bool = False  # attention norm with a separate value path
    note: str = ""


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


def find_sites(model: torch.nn.Module, nm: NormMap | None = None) -> tuple[list[Site], NormMap]:
    """Classify every residual norm of a Pre-LN model; refuse what the method cannot handle."""
    nm = nm if nm is not None else build_norm_map(model)
    problems = []
    for n in nm.residual_norms:
        if n.role not in ("pre", "final"):
            problems.append(f"`{n.name}` has role {n.role} (only Pre-LN norms and final norms can be removed)")
        elif n.kind.family not in FAMILIES:
            problems.append(f"`{n.name}` is a {n.kind.family}")
        elif n.calls > 1:
            problems.append(f"`{n.name}` is called {n.calls} times per forward pass")
    if not nm.by_role("pre"):
        problems.append("no Pre-LN norm was found")
    if problems:
        raise UnsupportedModel("cannot remove the norms: " + "; ".join(problems))
    sites = []
    n_blocks = len(nm.blocks)
    for n in nm.by_role("pre", "final"):
        readers = [(r.name, r.layout or "none") for r in n.readers]
        if n.role == "final":
            role = "final"
        else:
            role = "attn" if any(_is_attention(model, r) for r, _ in readers) else "mlp"
        idx = n_blocks if role == "final" else _block_index(n.name, n.block)
        sites.append(Site(n.name, role, idx, n.kind.family, readers))
    order = {r: i for i, r in enumerate(ROLES)}
    sites.sort(key=lambda s: (order[s.role], s.block_index, s.name))
    return sites, nm


def install(model: torch.nn.Module, *, mode: str = "fixed", momentum: float = 0.9, split_qkv: bool = True,
            dyt_alpha0: float | None = 0.5, nm: NormMap | None = None) -> Sites:
    """Replace every removable norm by a live ``FixedScaleNorm`` (same function until a path goes fake)."""
    sites, nm = find_sites(model, nm)
    kinds = {n.name: n.kind for n in nm.norms}
    out = Sites(model, sites, nm)
    for s in sites:
        old = model.get_submodule(s.name)
        k = kinds[s.name]
        new = FixedScaleNorm.from_module(old, k.family, k.eps if k.eps is not None else 0.0, k.weight_attr,
                                         k.bias_attr, mode=mode, momentum=momentum, dyt_alpha0=dyt_alpha0)
        p = next(old.parameters(), None)
        if p is not None:
            new.to(p.device)
        set_module(model, s.name, new)
        if s.role == "attn" and split_qkv:
            _route_values(out, s, new)
        elif s.role == "attn":
            s.note = "q/k/v split disabled: the whole norm is removed at the q/k stage"
    return out


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
