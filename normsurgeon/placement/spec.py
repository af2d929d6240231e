"""Placement specs: one ``SublayerSpec`` per sublayer, one ``BlockSpec`` per block, a ``PlacementSpec``
for the model, and the named schemes that expand into them.

One sublayer (attention or MLP), with ``N`` a norm and ``F`` the sublayer::

    h  = N_in(x) * scale            if in_norm   else x * scale
    y  = N_out(F(h))                if out_norm  else F(h)
    x' = alpha * (h if residual_from_normed else x) + y
    x' = N_post(x')                 if post_norm

Per-block spec strings compose schemes: comma-separated ``SCHEME[+MOD...][@START:END]`` items (0-based
block ranges, end exclusive, later items win), MODs ``lns``, ``qk``, ``qkv``, ``noqk``, ``dyt``::

    post@0:2,pre+lns@2:        # Mix-LN with two Post-LN blocks, LNS in the Pre-LN part

>>> spec = build_spec("mix", num_layers=8)
>>> [b.label for b in spec.blocks]
['post', 'post', 'pre', 'pre', 'pre', 'pre', 'pre', 'pre']
>>> [b.label for b in parse_block_spec("post@0:2,pre+lns+qk@2:", 4).blocks]
['post', 'post', 'pre+lns+qk', 'pre+lns+qk']
>>> round(build_spec("lns", 4).blocks[3].attn.scale, 4)
0.5
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from normsurgeon.errors import UsageError

EXACT, APPROX, NOT_PRESERVING = "exact", "approximate after calibration", "not function-preserving"
_RANK = {EXACT: 0, APPROX: 1, NOT_PRESERVING: 2}


class SublayerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    in_norm: bool = True
    out_norm: bool = False
    post_norm: bool = False
    scale: float = 1.0  # multiplies the input norm's output (LNS: 1/sqrt(layer))
    residual_alpha: float = 1.0  # DeepNorm: x' = N(alpha * x + F(x))
    residual_from_normed: bool = False  # HybridNorm FFN: x' = N(x) + F(N(x))


class BlockSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    attn: SublayerSpec = SublayerSpec()
    mlp: SublayerSpec = SublayerSpec()
    qk_norm: Literal["keep", "none", "qk", "qkv"] = "keep"  # keep: whatever the source has
    dyt: bool = False  # every norm of this block is Dynamic Tanh
    label: str = "pre"


class PlacementSpec(BaseModel):
    """The whole model: blocks plus model-level norms."""

    model_config = ConfigDict(extra="forbid")
    scheme: str
    blocks: list[BlockSpec]
    embedding_norm: bool = False
    final_dyt: bool = False
    options: dict = Field(default_factory=dict)  # the scheme's config (alpha, star, ...)


# -- one config object per scheme ------------------------------------------------------------------

class SchemeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    qk: Literal["keep", "none", "qk", "qkv"] = "keep"  # the qk-norm toggle composes with every scheme


class PreConfig(SchemeConfig):
    pass


class PostConfig(SchemeConfig):
    pass


class PeriConfig(SchemeConfig):
    embedding_norm: bool = False  # recommended when training from scratch (research pilot: 2.36 vs 2.89)
    calibrate: bool = True  # output-norm gain = mean token RMS of the sublayer output


class OutputOnlyConfig(SchemeConfig):
    calibrate: bool = True


class MixConfig(SchemeConfig):
    alpha: float = Field(0.25, ge=0.0, le=1.0)  # fraction of Post-LN blocks, placed first


class LNSConfig(SchemeConfig):
    pass


class DeepNormConfig(SchemeConfig):
    residual_alpha: float | None = None  # default (2L)^(1/4) (DeepNet, decoder-only)
    init_beta: float | None = None  # from-config only: v/o/FFN weights x beta, default (8L)^(-1/4)


class HybridNormConfig(SchemeConfig):
    star: bool = False  # HybridNorm*: block 0 keeps Pre-Norm attention and a Pre-Norm FFN


class QKNormConfig(SchemeConfig):
    qk: Literal["keep", "none", "qk", "qkv"] = "qk"


class DyTConfig(SchemeConfig):
    alpha0: float = 0.5  # from-config init (DyT paper default); conversion: alpha = 1/RMS(input)
    calibrate: bool = True


SCHEMES: dict[str, type[SchemeConfig]] = {
    "pre": PreConfig, "post": PostConfig, "peri": PeriConfig, "output-only": OutputOnlyConfig, "mix": MixConfig,
    "lns": LNSConfig, "deepnorm": DeepNormConfig, "hybridnorm": HybridNormConfig, "qk-norm": QKNormConfig,
    "dyt": DyTConfig,
}


def _sub(kind: str, layer: int, num_layers: int, alpha: float | None = None) -> tuple[SublayerSpec, SublayerSpec]:
    if kind == "pre":
        return SublayerSpec(), SublayerSpec()
    if kind == "post":
        s = SublayerSpec(in_norm=False, post_norm=True)
        return s, s
    if kind == "peri":
        s = SublayerSpec(out_norm=True)
        return s, s
    if kind == "output-only":
        s = SublayerSpec(in_norm=False, out_norm=True)
        return s, s
    if kind == "deepnorm":
        a = alpha if alpha is not None else (2.0 * num_layers) ** 0.25
        s = SublayerSpec(in_norm=False, post_norm=True, residual_alpha=a)
        return s, s
    if kind == "hybridnorm":
        return SublayerSpec(in_norm=False), SublayerSpec(residual_from_normed=True)
    raise UsageError(f"unknown block scheme {kind!r} (pre, post, peri, output-only, deepnorm, hybridnorm)")


def block(kind: str, layer: int, num_layers: int, mods: tuple[str, ...] = (), alpha: float | None = None) -> BlockSpec:
    """The BlockSpec of 0-based block ``layer`` under base scheme ``kind`` plus modifiers."""
    attn, mlp = _sub(kind, layer, num_layers, alpha)
    qk, dyt = ("qkv" if kind == "hybridnorm" else "keep"), False
    for m in mods:
        if m == "lns":
            if not (attn.in_norm and mlp.in_norm):
                raise UsageError(f"lns scales input norms; block scheme {kind!r} has none on some sublayer")
            s = 1.0 / math.sqrt(layer + 1)
            attn, mlp = attn.model_copy(update={"scale": s}), mlp.model_copy(update={"scale": s})
        elif m in ("qk", "qkv"):
            qk = m
        elif m == "noqk":
            qk = "none"
        elif m == "dyt":
            dyt = True
        else:
            raise UsageError(f"unknown modifier {m!r} (lns, qk, qkv, noqk, dyt)")
    return BlockSpec(attn=attn, mlp=mlp, qk_norm=qk, dyt=dyt, label="+".join((kind,) + mods))


def build_spec(scheme: str, num_layers: int, config: SchemeConfig | dict | None = None) -> PlacementSpec:
    """Expand a named scheme (see ``SCHEMES``) for a model with ``num_layers`` blocks."""
    if scheme not in SCHEMES:
        raise UsageError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    cfg = config if isinstance(config, SchemeConfig) else SCHEMES[scheme](**(config or {}))
    L = num_layers
    qk_mod: tuple[str, ...] = () if cfg.qk == "keep" else ({"none": "noqk"}.get(cfg.qk, cfg.qk),)
    if scheme == "mix":
        n_post = round(cfg.alpha * L)
        blocks = [block("post" if i < n_post else "pre", i, L, qk_mod) for i in range(L)]
    elif scheme == "lns":
        blocks = [block("pre", i, L, ("lns",) + qk_mod) for i in range(L)]
    elif scheme == "dyt":
        blocks = [block("pre", i, L, ("dyt",) + qk_mod) for i in range(L)]
    elif scheme == "qk-norm":
        blocks = [block("pre", i, L, qk_mod) for i in range(L)]
    elif scheme == "hybridnorm":
        blocks = [block("hybridnorm", i, L, qk_mod) for i in range(L)]
        if cfg.star:
            blocks[0] = BlockSpec(qk_norm=blocks[0].qk_norm, label="hybridnorm*-block0")
    elif scheme == "deepnorm":
        blocks = [block("deepnorm", i, L, qk_mod, cfg.residual_alpha) for i in range(L)]
    else:
        blocks = [block(scheme, i, L, qk_mod) for i in range(L)]
    return PlacementSpec(scheme=scheme, blocks=blocks, embedding_norm=getattr(cfg, "embedding_norm", False),
                         final_dyt=scheme == "dyt", options=cfg.model_dump())


def parse_block_spec(text: str, num_layers: int) -> PlacementSpec:
    """Parse ``SCHEME[+MOD...][@START:END]`` items (see the module docstring)."""
    blocks = [block("pre", i, num_layers) for i in range(num_layers)]
    any_dyt = False
    for item in (t.strip() for t in text.split(",") if t.strip()):
        body, _, rng = item.partition("@")
        kind, *mods = body.split("+")
        try:
            start_s, _, end_s = rng.partition(":") if rng else ("", "", "")
            start = int(start_s) if start_s else 0
            end = int(end_s) if end_s else num_layers
            if not rng:
                start, end = 0, num_layers
            elif ":" not in rng:
                end = start + 1
        except ValueError:
            raise UsageError(f"cannot read block range {rng!r} in {item!r} (use START:END, 0-based)") from None
        if not (0 <= start < end <= num_layers):
            raise UsageError(f"block range {rng!r} is outside 0:{num_layers}")
        for i in range(start, end):
            blocks[i] = block(kind, i, num_layers, tuple(mods))
        any_dyt |= "dyt" in mods
    return PlacementSpec(scheme=f"blocks:{text}", blocks=blocks, final_dyt=any_dyt and all(b.dyt for b in blocks))


def preservation(spec: PlacementSpec, calibrate: bool = True) -> dict:
    """What a conversion from a trained Pre-LN model preserves, with the reason for each block kind."""
    reasons: dict[str, str] = {}
    level = EXACT
    for b in spec.blocks:
        for sub in (b.attn, b.mlp):
            if not sub.in_norm or sub.post_norm or sub.residual_alpha != 1.0 or sub.residual_from_normed:
                level = max(level, NOT_PRESERVING, key=_RANK.get)
                reasons[b.label] = "moves or removes norms on the residual path: the stream itself changes"
            elif sub.out_norm:
                lvl = APPROX if calibrate else NOT_PRESERVING
                level = max(level, lvl, key=_RANK.get)
                reasons.setdefault(b.label, "added output norms: gain = mean token RMS of the sublayer output"
                                   if calibrate else "added output norms with gain 1")
        if b.qk_norm in ("qk", "qkv", "none"):
            level = max(level, NOT_PRESERVING, key=_RANK.get)
            reasons.setdefault(b.label, f"qk-norm {b.qk_norm}: attention logits change (gains calibrated)")
        if b.dyt:
            level = max(level, APPROX if calibrate else NOT_PRESERVING, key=_RANK.get)
            reasons.setdefault(b.label, "DyT replaces each norm; alpha = 1/RMS(norm input) on calibration data")
        if b.attn.scale != 1.0 or b.mlp.scale != 1.0:
            reasons.setdefault(b.label, "LNS: 1/sqrt(layer) folded into the input-norm gains (exact)")
        reasons.setdefault(b.label, "unchanged Pre-LN block (exact)")
    if spec.embedding_norm:
        level = max(level, NOT_PRESERVING, key=_RANK.get)
        reasons["embedding norm"] = "a norm added on the embeddings"
    return {"level": level, "reasons": reasons}
