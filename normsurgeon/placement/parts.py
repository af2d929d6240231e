"""What a decoder's anatomy is made of (found by ``anatomy.find_anatomy``): its sublayers (attention, MLP),
the attention's q / k / v projections and heads, its blocks, and the whole ``Anatomy``.
"""
from __future__ import annotations

import collections
import dataclasses

from normsurgeon.graph.norm_kinds import NormKind


@dataclasses.dataclass
class Sublayer:
    kind: str  # "attention" | "mlp"
    norm: str  # its input (pre) norm; one norm may feed both sublayers of a parallel block
    readers: list[str]  # linear layers reading that norm's output on the way to ``writer``
    writer: str  # what the norm map names as its term of the stream (a module, or fused expert weights)
    modules: list[str]  # every linear (or Conv1D) layer from the readers to the writer
    order: int = 0  # when its writer runs (graph position): a parallel block's last writer closes its sum
    dropout: float = 0.0  # dropout between the writer and the residual add (active in training mode only)
    output: str = ""  # the module whose output is added (the writer; for routed experts the block's child holding them)
    experts: list[str] = dataclasses.field(default_factory=list)  # stacked expert weights (MoE), for DeepNorm's init
    norm_order: int = 0  # when its input norm runs (graph position): a parallel block's first norm starts its sum

    def __post_init__(self):
        self.output = self.output or self.writer

    @property
    def index(self) -> int:  # 0 attention, 1 MLP (spec fields, output-norm names, calibration keys)
        return 0 if self.kind == "attention" else 1


@dataclasses.dataclass
class Attention:
    scope: str  # the module running the attention op (added q/k/v norms are registered on it)
    op: str  # "scaled_dot_product_attention" | "softmax"
    proj: dict[str, str]  # role (q, k, v) -> projection module (one name for all three when fused)
    head_dims: dict[str, int]  # role -> head width at the attention op
    channels: dict[str, list[list[int]]] | None = None  # fused: role -> heads -> output channels of the projection
    native_norms: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> inner norm (Qwen3 q_norm)
    problem: str | None = None  # why q, k, v could not be mapped (QK-norm is then refused with it)

    @property
    def fused(self) -> bool:
        return len(set(self.proj.values())) < len(self.proj)

    def layout(self, role: str) -> list[list[int]] | None:
        """Head -> channel lists of ``role`` within its projection's output (None: contiguous ``view(-1, hd)``)."""
        if self.channels is not None and role in self.channels and list(self.proj.values()).count(self.proj[role]) > 1:
            return self.channels[role]
        return None


@dataclasses.dataclass
class Block:
    index: int
    name: str
    parallel: bool
    sublayers: list[Sublayer]  # in stream order (a parallel block: attention first)
    attention: Attention | None
    unit_residual: bool = True  # the block adds its writers' outputs to the stream with coefficient 1
    residual_problem: str | None = None

    @property
    def attn(self) -> Sublayer:
        return next(s for s in self.sublayers if s.kind == "attention")

    @property
    def mlp(self) -> Sublayer:
        return next(s for s in self.sublayers if s.kind == "mlp")

    @property
    def norms(self) -> list[str]:
        """Its distinct input norms, in stream order."""
        return list(dict.fromkeys(s.norm for s in self.sublayers))

    @property
    def groups(self) -> list[list[Sublayer]]:
        """Sublayers that read the same stream value: one per sublayer, or one for a parallel block."""
        return [self.sublayers] if self.parallel else [[s] for s in self.sublayers]

    @property
    def shape(self) -> str:
        if not self.parallel:
            return "sequential"
        return "parallel, one shared norm" if len(self.norms) == 1 else "parallel, two norms"


@dataclasses.dataclass
class Anatomy:
    model_type: str
    backbone: str  # the module holding the blocks (an added embedding norm is registered on it)
    blocks: list[Block]
    embedding_writers: list[str]  # what is summed into the stream before block 0
    embedding_norms: list[str]  # norms on the embeddings (BLOOM)
    final_norm: str
    head: list[str]  # the final norm's readers
    norm_kinds: dict[str, NormKind]
    norm_readers: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # input norm -> its linear readers
    # input norms with a reader that is not a linear layer of the norm's width (pooling, fused experts...)
    odd_readers: set[str] = dataclasses.field(default_factory=set)

    def gain_offset(self, norm: str) -> float:
        """1.0 where a norm's gain is ``1 + w`` (Gemma's RMSNorm, Nemotron's LayerNorm1P), else 0.0."""
        k = self.norm_kinds[norm]
        return 1.0 if k.family == "rmsnorm_offset" else float(k.gain_offset)

    def summary(self) -> str:
        """One line: block shapes and how q, k, v are projected."""
        shapes = collections.Counter(b.shape for b in self.blocks)
        parts = [f"{n} {s} blocks" for s, n in shapes.items()]
        moe = sum(1 for b in self.blocks if any(s.experts for s in b.sublayers))
        if moe:
            parts.append(f"{moe} with routed experts")
        a = self.blocks[0].attention
        if a is not None:
            if a.fused:
                parts.append(f"q/k/v fused in one projection (`{a.proj['q'].rsplit('.', 1)[-1]}`)")
            else:
                parts.append("separate q/k/v projections")
        parts.append(f"final norm `{self.final_norm}`")
        if self.embedding_norms:
            parts.append(f"embedding norm `{self.embedding_norms[0]}`")
        return ", ".join(parts)
