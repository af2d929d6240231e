"""The norm map: every norm, what reads it, what writes the residual stream, and each block's placement.

Built from the recorded dataflow (``trace.py``), never from module names. The central idea is a
*linear decomposition*: for every recorded tensor we compute the set of "atoms" (leaf-module outputs,
parameters read directly) whose sum it is, following only ops that keep a tensor a linear
combination of its inputs along the feature axis (add, scalar mul, views, dropout in eval, concat on
a token axis). A residual stream is a chain of such sums; its atoms are the stream's *writers*.
(What writes the stream and who reads it raw: ``residual.py``.)

Roles of token norms (LayerNorm / RMSNorm families):
- ``pre``       reads the stream; its output reaches a block that writes back into the stream.
- ``final``     reads the stream; its output never reaches the stream again (feeds the heads).
- ``post``      normalizes the stream itself (its output becomes the stream): Post-LN.
- ``output``    normalizes one sublayer's output before it is added (Peri-LN / sandwich).
- ``embedding`` normalizes a table lookup before it enters the stream (BLOOM).
- ``inner``     anything else (QK-norms, norms inside attention or MLP): never touched.

>>> import torch, transformers as T
>>> cfg = T.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
>>> nm = build_norm_map(T.GPT2LMHeadModel(cfg).eval())
>>> [(n.name, n.role) for n in nm.norms]
[('transformer.h.0.ln_1', 'pre'), ('transformer.h.0.ln_2', 'pre'), ('transformer.ln_f', 'final')]
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from normsurgeon.graph.layouts import has_bias, in_features, layout_of, out_features
from normsurgeon.graph.norm_kinds import NormKind, classify_norm
from normsurgeon.graph.decompose import TOKEN_REDUCTIONS, TRANSPARENT, decompose, feature_axis_kept, param_product
from normsurgeon.graph.layer_scale import scaled_writer
from normsurgeon.graph.placement import BlockInfo, block_of, block_placements, find_blocks
from normsurgeon.graph.residual import find_stream_atoms, find_stream_problems, lookups_only, opaque_terms
from normsurgeon.graph.trace import DataflowGraph, Node, trace_dataflow
from normsurgeon.io.example_inputs import example_inputs as build_example_inputs


@dataclasses.dataclass
class Reader:
    """A module that reads a norm's output along its input axis."""

    name: str
    layout: str | None  # "linear" | "conv1d" | None (not foldable)
    in_features: int | None
    has_bias: bool


@dataclasses.dataclass
class Writer:
    """Something whose output is summed into a residual stream."""

    name: str
    kind: str  # "linear" | "conv1d" | "embedding" | "conv" | "param" | "buffer" | "norm" | "other"
    width: int | None
    has_bias: bool = False
    scale: str | None = None  # a layer-scale parameter multiplying its output (graph/layer_scale.py)


@dataclasses.dataclass
class NormInfo:
    name: str
    kind: NormKind
    role: str
    block: str | None
    calls: int
    readers: list[Reader]
    stream_writers: list[str]  # writers summed into this norm's input (for stream-reading norms)
    problems: list[str]  # why this norm's affine cannot be folded, if any
    reads_output: bool = False  # its (transparent) output is a model output
    input_node: int = -1
    summed_with: list[str] = dataclasses.field(default_factory=list)  # terms its output is added to
    # Why its gain and shift cannot move into its readers (a reader that is not a linear layer: mean
    # pooling, a token shift, fused expert weights): the affine then stays on the norm, which is still
    # exact on a centred stream. Not a refusal for Pre-RMSNorm.
    keep_affine: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class NormMap:
    """Everything the recipes need to know about a model's norms, derived from one traced forward pass."""

    model_class: str
    hidden_size: int | None
    norms: list[NormInfo]
    writers: list[Writer]
    blocks: list[BlockInfo]
    placement: str
    stream_problems: list[str]
    other_norm_ops: list[str]  # functional norms called outside any module
    embedding_tables: list[str] = dataclasses.field(default_factory=list)  # nn.Embedding modules
    # terms added to a normalized sum that are neither layers nor parameters (positions computed at run
    # time, a non-linear first term): the stream cannot be followed through them
    opaque_terms: list[str] = dataclasses.field(default_factory=list)

    # -- selections ----------------------------------------------------------------------------
    def by_role(self, *roles: str) -> list[NormInfo]:
        return [n for n in self.norms if n.role in roles]

    def norm(self, name: str) -> NormInfo:
        for n in self.norms:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def residual_norms(self) -> list[NormInfo]:
        return [n for n in self.norms if n.role in ("pre", "final", "post", "output", "embedding")]

    def families(self) -> set[str]:
        return {n.kind.family for n in self.residual_norms}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building the map
# ----------------------------------------------------------------------------------------------

def _reachable(graph: DataflowGraph, start: int) -> set[int]:
    seen, stack = set(), [start]
    while stack:
        i = stack.pop()
        for u in graph.users.get(i, []):
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _walk_readers(graph: DataflowGraph, start: int, norm_names: set[str]) -> tuple[list[str], list[str], bool]:
    """Follow a norm's output through transparent ops; return (reader modules, problems, reaches output)."""
    readers: list[str] = []
    problems: list[str] = []
    reaches_output = start in graph.outputs
    stack, seen = [start], {start}
    while stack:
        i = stack.pop()
        for u in graph.users.get(i, []):
            node = graph.nodes[u]
            if u in seen:
                continue
            seen.add(u)
            if node.kind == "module":
                mod = graph.modules[node.target]
                if isinstance(mod, torch.nn.Dropout):
                    stack.append(u)
                    reaches_output |= u in graph.outputs
                elif node.target not in readers:
                    readers.append(node.target)
            elif node.kind == "op" and (node.target in TRANSPARENT or node.target in TOKEN_REDUCTIONS) \
                    and feature_axis_kept(graph, node):
                stack.append(u)
                reaches_output |= u in graph.outputs
            else:
                problems.append(f"its output goes through `{node.target}` before reaching a linear layer")
    return readers, problems, reaches_output


def build_norm_map(model: torch.nn.Module, example: dict[str, Any] | None = None) -> NormMap:
    """Trace ``model`` once (on ``example`` kwargs, or a tiny input built from its config) and analyse it."""
    example = example if example is not None else example_inputs(model)
    try:
        graph = trace_dataflow(model, (), example)
    except RuntimeError as e:
        if not _is_float64(model) or not any(w in str(e) for w in ("Double", "double", "float64")):
            raise
        # Some kernels have no float64 version (PhiMoE's grouped expert matmul): the structure is the same
        # in float32, so trace a float32 copy; the plan still acts on (the names of) the float64 model.
        copy32 = copy.deepcopy(model).float()
        graph = trace_dataflow(copy32, (), {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                                            for k, v in example.items()})
    return analyse(model, graph)


def _is_float64(model: torch.nn.Module) -> bool:
    return any(p.dtype == torch.float64 for p in model.parameters())


def _parameter_free_norms(graph: DataflowGraph) -> dict[str, NormKind]:
    """Norm modules without parameters (OLMo-1's ``OlmoLayerNorm``) are not leaves, so the tracer sees the
    ``layer_norm`` call inside them. When such a module makes exactly one weight- and bias-free
    ``layer_norm`` call over its input's last axis, that op node becomes the module's node (in place),
    and the module a LayerNorm without affine."""
    found: dict[str, NormKind] = {}
    calls: dict[str, list[Node]] = {}
    for n in graph.nodes:
        if n.kind == "op" and n.target == "layer_norm" and n.scope:
            calls.setdefault(n.scope, []).append(n)
    for scope, ns in calls.items():
        mod = graph.modules.get(scope)
        if len(ns) != 1 or mod is None or next(iter(mod.parameters()), None) is not None:
            continue
        n = ns[0]
        # the tracer flattens arguments: normalized_shape (d,) arrives as the int d; a second int means 2-D
        ints = [s for s in n.scalars if isinstance(s, int) and not isinstance(s, bool)]
        shape = tuple(ints) if ints else tuple(n.kwargs.get("normalized_shape") or ())
        eps = n.kwargs.get("eps", next((s for s in n.scalars if isinstance(s, float)), 1e-5))
        if len(n.inputs) != 1 or len(shape) != 1 or n.shape[-1:] != shape \
                or n.kwargs.get("weight") is not None or n.kwargs.get("bias") is not None:
            continue
        n.kind, n.target = "module", scope
        found[scope] = NormKind("layernorm", int(shape[0]), float(eps), False, False, type(mod).__name__)
    return found


def analyse(model: torch.nn.Module, graph: DataflowGraph) -> NormMap:
    kinds: dict[str, NormKind] = _parameter_free_norms(graph)
    for n in graph.nodes:
        if n.kind == "module" and n.target not in kinds:
            k = classify_norm(graph.modules[n.target])
            if k is not None:
                kinds[n.target] = k
    token_norms = {name for name, k in kinds.items() if k.is_token_norm}
    terms = decompose(graph, token_norms)

    stream_atoms = find_stream_atoms(graph, terms, token_norms)

    def is_stream(idx: int) -> bool:
        t = terms[idx]
        return t is not None and len(t) > 0 and t <= stream_atoms

    blocks = find_blocks(model)
    norm_calls: dict[str, list[Node]] = {}
    for n in graph.nodes:
        if n.kind == "module" and n.target in kinds:
            norm_calls.setdefault(n.target, []).append(n)

    scales = {a: sw for a in stream_atoms if graph.nodes[a].kind in ("op", "module")
              and (sw := scaled_writer(graph, graph.nodes[a], terms)) is not None}

    products = {a: pp for a in stream_atoms if (pp := param_product(graph, graph.nodes[a])) is not None}

    def atom_name(a: int) -> str:
        """A stream atom's writer name (a layer-scaled writer is named by its linear layer, a parameter
        product by its parameter)."""
        if a in products:
            return products[a][0]
        return graph.nodes[scales[a][0]].target if a in scales else graph.nodes[a].target

    writer_nodes = {atom_name(a): graph.nodes[scales[a][0]] if a in scales else graph.nodes[a] for a in stream_atoms}
    writer_scale = {atom_name(a): sw[1] for a, sw in scales.items()}
    norms: list[NormInfo] = []
    for name, calls in norm_calls.items():
        kind = kinds[name]
        node = calls[0]
        problems: list[str] = []
        if len(calls) > 1:
            problems.append(f"the module is called {len(calls)} times in one forward pass")
        in_idx = node.inputs[0] if node.inputs else -1
        role = "inner"
        stream_writers: list[str] = []
        readers_names, reader_problems, reads_output = _walk_readers(graph, node.idx, token_norms)
        if not kind.is_token_norm:
            role = "batchnorm" if kind.family == "batchnorm" else kind.family
        elif in_idx >= 0 and kind.size is not None and graph.nodes[in_idx].shape[-1:] == (kind.size,):
            out_in_stream = node.idx in stream_atoms
            if is_stream(in_idx):
                stream_writers = sorted({atom_name(a) for a in terms[in_idx]})
                if out_in_stream:
                    # a norm over a sum of lookups only (mBART: tokens + positions), whose terms reach the
                    # stream only through it, is the stream's embedding norm, not a Post-LN
                    role = "embedding" if lookups_only(graph, terms, in_idx, node.idx) else "post"
                else:
                    reach = _reachable(graph, node.idx)
                    role = "pre" if reach & stream_atoms else "final"
            elif out_in_stream:
                atoms = terms[in_idx] or frozenset()
                lookups = all(layout_of(graph.modules.get(graph.nodes[a].target, torch.nn.Identity())) == "embedding"
                              or graph.nodes[a].kind == "param" for a in atoms) and atoms
                role = "embedding" if lookups else "output"
                stream_writers = sorted({atom_name(a) for a in atoms})
        readers = []
        for r in readers_names:
            mod = graph.modules[r]
            readers.append(Reader(r, layout_of(mod) if layout_of(mod) in ("linear", "conv1d") else None,
                                  in_features(mod), has_bias(mod)))
        keep: list[str] = []
        if role in ("pre", "final"):
            keep.extend(reader_problems)
            for r in readers:
                if r.layout is None:
                    keep.append(f"its reader `{r.name}` ({type(graph.modules[r.name]).__name__}) is not a linear layer")
                elif r.in_features != kind.size:
                    keep.append(f"its reader `{r.name}` reads {r.in_features} features, not {kind.size}")
        partners = sorted({atom_name(a) for t in terms if t is not None and node.idx in t
                           for a in t if a != node.idx})
        norms.append(NormInfo(name, kind, role, block_of(name, blocks), len(calls), readers, stream_writers,
                              problems, reads_output, in_idx, partners, sorted(set(keep))))

    writers = []
    product_axis = {pp[0]: pp[1] for pp in products.values()}
    for name, wn in sorted(writer_nodes.items(), key=lambda kv: kv[1].idx):
        if name in product_axis:  # fused expert weights: centre along the parameter's output axis
            writers.append(Writer(name, f"param:{product_axis[name]}", wn.shape[-1]))
        elif wn.kind == "param":
            kind = "buffer" if name not in dict(model.named_parameters()) else "param"
            writers.append(Writer(name, kind, wn.shape[-1] if wn.shape else None))
        else:
            mod = graph.modules[name]
            if name in kinds:
                writers.append(Writer(name, "norm", kinds[name].size))
            else:
                writers.append(Writer(name, layout_of(mod) or "other", out_features(mod), has_bias(mod),
                                      writer_scale.get(name)))

    stream_problems = find_stream_problems(graph, terms, stream_atoms, is_stream, kinds)
    hidden = _hidden_size(norms)
    block_infos = block_placements(blocks, norms, writers)
    placements = {b.placement for b in block_infos if b.placement != "none"} or {"none"}
    placement = placements.pop() if len(placements) == 1 else "mixed"
    other_ops = sorted({n.target for n in graph.nodes if n.kind == "op"
                        and n.target in ("layer_norm", "rms_norm", "group_norm", "batch_norm")})
    tables = [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)]
    return NormMap(type(model).__name__, hidden, norms, writers, block_infos, placement, stream_problems,
                   other_ops, tables, opaque_terms(graph, terms, token_norms))


def _hidden_size(norms: list[NormInfo]) -> int | None:
    sizes = {n.kind.size for n in norms if n.role in ("pre", "final", "post")}
    return sizes.pop() if len(sizes) == 1 else None


def example_inputs(model: torch.nn.Module, seq_len: int = 8) -> dict[str, Any]:
    """A tiny deterministic input for tracing, built from the model itself (``io/example_inputs.py``)."""
    return build_example_inputs(model, seq_len=seq_len)


