"""A Pre-LN decoder's *anatomy*, read from one traced forward pass and its norm map: no module names.

What is found, and how (``find_anatomy``):

- **blocks and sublayers**: the stream-reading norms (roles ``pre`` and ``final``) in stream order; the
  ``pre`` norms that read the same stream value form one *group*. What a group adds to the stream is the
  difference between the writers summed into the next group's input and into its own (the norm map's
  linear decomposition). A block is two groups of one writer each (sequential) or one group of two
  writers (parallel: GPT-J, GPT-NeoX, Falcon, Phi); each writer is one sublayer.
- **a sublayer's readers**: the linear readers of the group's norms whose outputs reach that writer
  (forward reachability in the graph, not going past the stream); its *modules* are every leaf module on
  those paths (the FFN weights of DeepNorm's init).
- **attention vs MLP**: the sublayer whose paths contain the attention op (``scaled_dot_product_attention``
  or a ``softmax`` between two matmuls) is the attention.
- **routed experts** (Mixtral, OLMoE, PhiMoE, DBRX): a writer that is a stacked expert weight (the norm
  map's ``param:*`` writers) is the MLP; the block's child module holding it is the output that gets
  hooked (checked by the residual probe below), its readers the router.
- **q / k / v**: the attention op's query, key and value inputs; each attention reader is the projection
  of the inputs it reaches. One reader reaching several is a *fused* projection (GPT-2's ``c_attn``,
  GPT-NeoX/Falcon/BLOOM ``query_key_value``); which of its output channels are q, k and v, head by head, is
  found by behaviour: its output is replaced by channel numbers and read back at the attention op's
  inputs at position 0 (where rotary embeddings are the identity). Head widths come from those inputs'
  shapes; native QK norms (Qwen3, Persimmon) are the ``inner`` norms on the q / k paths.
- **embedding writers** (what block 0 reads: token and position tables, BLOOM's embedding norm), the
  **final norm** and the **head** (its readers).
- **unit residual adds**: one probe forward checks that each group's output is exactly its input plus
  its writers' outputs, which the residual rewrites of ``runtime.py`` rely on.

>>> import transformers as T
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
>>> a = find_anatomy(m)
>>> b = a.blocks[0]
>>> b.attn.norm, b.attn.writer, b.attention.proj, b.attention.fused
('transformer.h.0.ln_1', 'transformer.h.0.attn.c_proj', {'q': 'transformer.h.0.attn.c_attn', 'k': 'transformer.h.0.attn.c_attn', 'v': 'transformer.h.0.attn.c_attn'}, True)
>>> [len(h) for h in b.attention.channels["v"]], b.attention.channels["v"][0][0]   # 2 heads of 8; v is the last third
([8, 8], 32)
>>> a.final_norm, a.head, a.embedding_writers
('transformer.ln_f', ['lm_head'], ['transformer.wte', 'transformer.wpe'])
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from normsurgeon.errors import UnsupportedModel
from normsurgeon.graph.layouts import layout_of
from normsurgeon.graph.norm_kinds import NormKind
from normsurgeon.graph.trace import DataflowGraph, is_leaf

PROBE_TOKENS = 7  # the trace's sequence length: a prime, so that the token axis is told from heads and head widths
ATTENTION_OPS = ("scaled_dot_product_attention",)
SOFTMAX_OPS = ("softmax", "_softmax", "softmax_")
MATMUL_OPS = ("matmul", "bmm", "baddbmm", "einsum", "__matmul__", "__rmatmul__")
ROLES = ("q", "k", "v")


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


# ----------------------------------------------------------------------------------------------
# Finding it
# ----------------------------------------------------------------------------------------------

def find_anatomy(model: torch.nn.Module) -> Anatomy:
    """Trace ``model`` once (plus two small probes) and derive its anatomy; ``UnsupportedModel`` otherwise."""
    from normsurgeon.graph.normmap import analyse
    from normsurgeon.graph.trace import trace_dataflow
    from normsurgeon.io.example_inputs import example_inputs

    if any(hasattr(m, "ns_spec") for m in model.modules()):
        raise UnsupportedModel("this model was already placed; place from the original Pre-LN model instead")
    was_training = model.training
    model.eval()
    try:
        ex = example_inputs(model, seq_len=PROBE_TOKENS)
        graph = trace_dataflow(model, (), ex)
        nm = analyse(model, graph)
        tokens = int(ex["input_ids"].shape[-1]) if isinstance(ex.get("input_ids"), torch.Tensor) else PROBE_TOKENS
        anatomy = _build(model, graph, nm, ex, tokens)
    finally:
        model.train(was_training)
    return anatomy


def _refuse(msg: str) -> UnsupportedModel:
    return UnsupportedModel(f"`place`: {msg}")


def _build(model, graph: DataflowGraph, nm, ex: dict, tokens: int) -> Anatomy:
    bad = [b for b in nm.blocks if b.placement not in ("pre-ln", "parallel", "none")]
    if bad:
        kinds = collections.Counter(b.placement for b in bad)
        what = ", ".join(f"{n} {k}" for k, n in kinds.items())
        raise _refuse(f"rewrites Pre-LN models; {len(bad)} block(s) are not Pre-LN ({what}), first `{bad[0].name}`")
    finals = nm.by_role("final")
    pres = [n for n in nm.by_role("pre") if n.block is not None]
    if not pres:
        raise _refuse(f"no Pre-LN blocks were found in {type(model).__name__} (placement: {nm.placement})")
    if len(finals) != 1:
        raise _refuse(f"expects one final norm before the head; {type(model).__name__} has {len(finals)}")
    final = finals[0]
    if final.block is not None:
        raise _refuse(f"the residual stream could not be followed through `{final.block}`: what is added after "
                      f"`{final.name}` is not a sum of layer outputs (routed experts?)")
    node_of = {}  # module name -> its (first) graph node
    for n in graph.nodes:
        if n.kind == "module":
            node_of.setdefault(n.target, n.idx)
    writers = {w.name: w for w in nm.writers}
    stream_nodes = {node_of[w] for w in writers if w in node_of}
    stream_nodes |= {node_of[n.name] for n in nm.residual_norms if n.name in node_of}

    # groups: pre norms reading one stream value, in stream order; then the final norm
    by_input: dict[int, list] = {}
    for n in sorted(pres, key=lambda n: n.input_node):
        by_input.setdefault(n.input_node, []).append(n)
    groups = list(by_input.values())
    atoms = [set(g[0].stream_writers) for g in groups] + [set(final.stream_writers)]
    for k in range(len(groups)):
        if not atoms[k] <= atoms[k + 1]:
            raise _refuse(f"the residual stream is not one chain of sums at `{groups[k][0].name}`")
        if len({n.block for n in groups[k]}) != 1:
            raise _refuse(f"norms of different blocks read one stream value (`{groups[k][0].name}`)")
    if final.input_node < groups[-1][0].input_node:
        raise _refuse(f"the final norm `{final.name}` reads the stream before the last block")

    core = _attention_cores(graph)
    per_block: dict[str, list[tuple[list, list[str]]]] = {}
    for k, g in enumerate(groups):
        new = sorted(atoms[k + 1] - atoms[k], key=lambda w: node_of.get(w, -1))
        per_block.setdefault(g[0].block, []).append((g, new))

    blocks: list[Block] = []
    for i, (bname, gs) in enumerate(per_block.items()):
        blocks.append(_block(i, bname, gs, graph, nm, node_of, writers, stream_nodes, core, tokens))

    fused = [b for b in blocks if b.attention is not None and b.attention.fused and b.attention.problem is None]
    if fused:
        _probe_fused(model, graph, ex, fused, tokens)
    _check_residuals(model, ex, blocks, final.name)
    for b in blocks:
        moe = [s for s in b.sublayers if s.output != s.writer]
        if moe and not b.unit_residual:
            raise _refuse(f"block `{b.name}` adds routed experts (`{moe[0].writer}`) whose layer output "
                          f"(`{moe[0].output}`) is not what the block adds to the stream")
    backbone = blocks[0].name.rsplit(".", 2)[0] if blocks[0].name.count(".") >= 2 else ""
    kinds = {n.name: n.kind for n in nm.norms}
    model_type = str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)
    emb = sorted(atoms[0], key=lambda w: node_of.get(w, -1))
    readers = {n.name: [r.name for r in n.readers] for n in pres}
    odd = {n.name for n in pres if n.keep_affine}
    return Anatomy(model_type, backbone, blocks, emb, [n.name for n in nm.by_role("embedding")], final.name,
                   [r.name for r in final.readers], kinds, readers, odd)


def _block(i, bname, gs, graph, nm, node_of, writers, stream_nodes, core, tokens: int) -> Block:
    n_writers = sum(len(new) for _, new in gs)
    if n_writers != 2 or len(gs) not in (1, 2):
        raise _refuse(f"block `{bname}` adds {n_writers} outputs to the stream in {len(gs)} step(s); "
                      f"expected an attention and an MLP")
    subs: list[Sublayer] = []
    cores: dict[str, int] = {}
    for norms, new in gs:
        outputs: dict[str, str] = {}
        for w in new:
            kind = writers[w].kind
            if kind.startswith("param:"):  # fused expert weights: the block's child holding them is the MoE layer
                rest = w[len(bname) + 1:].split(".", 1)[0] if w.startswith(bname + ".") else ""
                if not rest or f"{bname}.{rest}" == w:
                    raise _refuse(f"block `{bname}` adds `{w}` to the stream, which is not one module's output")
                outputs[w] = f"{bname}.{rest}"
                continue
            if w not in graph.modules or w not in node_of:
                raise _refuse(f"block `{bname}` adds `{w}` to the stream, which is not one module's output "
                              f"(routed experts?)")
            if kind in ("param", "buffer", "norm", "embedding"):
                raise _refuse(f"block `{bname}` adds `{w}` ({kind}) to the stream; expected a layer")
            calls = sum(1 for n in graph.nodes if n.kind == "module" and n.target == w and n.out_index == 0)
            if calls > 1:
                raise _refuse(f"`{w}` runs {calls} times in one forward pass (shared layers); its hooks would "
                              f"rewrite every call alike")
        for n in norms:
            if n.calls > 1:
                raise _refuse(f"`{n.name}` runs {n.calls} times in one forward pass (shared layers)")
        readers = [(n.name, r.name) for n in norms for r in n.readers]
        reach = {r: _reach(graph, node_of[r], stream_nodes) for _, r in readers if r in node_of}
        for w in new:
            if w in outputs:  # the readers inside the MoE layer (its router)
                mine = [(nname, r) for nname, r in readers if r.startswith(outputs[w] + ".")]
            else:
                mine = [(nname, r) for nname, r in readers if r in reach and node_of[w] in reach[r]]
            if not mine:
                raise _refuse(f"no reader of `{norms[0].name}` reaches `{w}` in block `{bname}`")
            inside = set().union(*(reach[r] for _, r in mine))
            hits = [c for c in core if c in inside] if w not in outputs else []
            kind = "attention" if hits else "mlp"
            if hits:
                cores[w] = hits[0]
            mods = [r for _, r in mine]
            for idx in sorted(inside | ({node_of[w]} if w in node_of else set())):
                nd = graph.nodes[idx]
                if nd.kind == "module" and nd.target not in mods and \
                        layout_of(graph.modules[nd.target]) in ("linear", "conv1d"):
                    mods.append(nd.target)
            experts = []
            if w in outputs:
                mod = graph.modules.get(outputs[w])
                inner = {m for m in mods}
                experts = [f"{outputs[w]}.{pn}" for pn, p in (mod.named_parameters() if mod is not None else [])
                           if p.dim() >= 2 and f"{outputs[w]}.{pn}".rsplit(".", 1)[0] not in inner]
            order = node_of.get(w, max(inside) if inside else 0)
            subs.append(Sublayer(kind, mine[0][0], list(dict.fromkeys(r for _, r in mine)), w, mods, order,
                                 _residual_dropout(graph, node_of[w]) if w in node_of else 0.0,
                                 outputs.get(w, w), experts, node_of.get(mine[0][0], 0)))
    kinds = [s.kind for s in subs]
    if sorted(kinds) != ["attention", "mlp"]:
        raise _refuse(f"block `{bname}` has sublayers {'+'.join(kinds)}; expected one attention and one MLP")
    parallel = len(gs) == 1
    if parallel:
        subs.sort(key=lambda s: s.index)
    attn = next(s for s in subs if s.kind == "attention")
    attention = _attention(graph, nm, node_of, stream_nodes, attn, cores[attn.writer], tokens)
    return Block(i, bname, parallel, subs, attention)


def _residual_dropout(graph: DataflowGraph, idx: int) -> float:
    """The largest dropout probability on the single path from a writer's output towards its residual add."""
    p, i = 0.0, idx
    while len(graph.users.get(i, [])) == 1:
        u = graph.nodes[graph.users[i][0]]
        if u.kind == "module" and isinstance(graph.modules[u.target], torch.nn.Dropout):
            p = max(p, float(graph.modules[u.target].p))
        elif u.kind == "op" and u.target in ("dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout"):
            q = u.kwargs.get("p", next((x for x in u.scalars if isinstance(x, float)), 0.0))
            p = max(p, float(q))
        else:
            break
        i = u.idx
    return p


def _reach(graph: DataflowGraph, start: int, stop: set[int]) -> set[int]:
    """Nodes reachable from ``start`` without going past a stream node (writers and stream norms)."""
    seen, stack = set(), [start]
    while stack:
        i = stack.pop()
        for u in graph.users.get(i, []):
            if u in seen:
                continue
            seen.add(u)
            if u not in stop:
                stack.append(u)
    return seen


def _attention_cores(graph: DataflowGraph) -> list[int]:
    """Attention ops: ``scaled_dot_product_attention``, or a softmax between two matmuls (eager attention)."""
    out = []
    for n in graph.nodes:
        if n.kind == "op" and n.target in ATTENTION_OPS:
            out.append(n.idx)
        elif n.kind == "op" and n.target in SOFTMAX_OPS and _qkv_nodes(graph, n.idx) is not None:
            out.append(n.idx)
    return out


def _qkv_nodes(graph: DataflowGraph, core: int) -> dict[str, tuple[int, int, int]] | None:
    """role -> (op node, argument position, node) of the attention op's query, key and value inputs."""
    n = graph.nodes[core]
    if n.target in ATTENTION_OPS:
        if len(n.inputs) < 3:
            return None
        return {r: (core, j, n.inputs[j]) for j, r in enumerate(ROLES)}
    score = _walk(graph, n.inputs[0], back=True) if n.inputs else None
    value = _walk(graph, core, back=False)
    if score is None or value is None:
        return None
    s, v = graph.nodes[score], graph.nodes[value]
    if len(s.inputs) < 2 or len(v.inputs) < 2:
        return None
    j_v = 1 if core in _ancestors(graph, v.inputs[0]) else 0
    return {"q": (score, len(s.inputs) - 2, s.inputs[-2]), "k": (score, len(s.inputs) - 1, s.inputs[-1]),
            "v": (value, j_v, v.inputs[j_v])}


def _walk(graph: DataflowGraph, start: int, back: bool, limit: int = 8) -> int | None:
    """The nearest matmul-like op before (``back``: from the softmax's input) or after a softmax, through
    at most ``limit`` elementwise ops or dropout modules (never through another layer)."""
    frontier, seen = [start], set()
    for _ in range(limit):
        nxt = []
        for i in frontier:
            if i in seen:
                continue
            seen.add(i)
            nd = graph.nodes[i]
            if nd.kind == "op" and nd.target in MATMUL_OPS and (back or i != start):
                return i
            passable = nd.kind == "op" or (nd.kind == "module" and isinstance(graph.modules[nd.target],
                                                                               torch.nn.Dropout))
            if passable:
                nxt.extend(nd.inputs if back else graph.users.get(i, []))
        frontier = nxt
    return None


def _ancestors(graph: DataflowGraph, start: int) -> set[int]:
    seen, stack = set(), [start]
    while stack:
        i = stack.pop()
        if i in seen or i < 0:
            continue
        seen.add(i)
        stack.extend(graph.nodes[i].inputs)
    return seen


def _attention(graph, nm, node_of, stream_nodes, attn: Sublayer, core: int, tokens: int) -> Attention:
    c = graph.nodes[core]
    op = "scaled_dot_product_attention" if c.target in ATTENTION_OPS else "softmax"
    a = Attention(c.scope, op, {}, {})
    qkv = _qkv_nodes(graph, core)
    if qkv is None:
        a.problem = f"the attention op in `{c.scope}` has no recognisable query, key and value inputs"
        return a
    reach = {r: _reach(graph, node_of[r], stream_nodes) for r in attn.readers}
    for role, (_, _, node) in qkv.items():
        src = [r for r in attn.readers if node in reach[r]]
        if len(src) != 1:
            a.problem = (f"the attention's {role} comes from {len(src)} of its input projections "
                         f"({', '.join(attn.readers)})")
            return a
        a.proj[role] = src[0]
        shape = graph.nodes[node].shape
        hd = shape[-1] if shape else 0
        if role == "k" and len(shape) >= 2 and shape[-1] == tokens and shape[-2] != tokens:
            hd = shape[-2]  # an eager attention's transposed key [.., hd, T]
        a.head_dims[role] = int(hd)
    for n in nm.by_role("inner"):
        idx = node_of.get(n.name)
        if idx is None or not any(idx in reach[r] for r in attn.readers):
            continue
        down = _reach(graph, idx, stream_nodes) | {idx}
        hit = [role for role, (_, _, node) in qkv.items() if node in down]
        if len(hit) == 1:
            a.native_norms[hit[0]] = n.name
    a._graph_qkv = qkv  # graph positions, for the fused-channel probe (not part of the anatomy's data)
    return a


# ----------------------------------------------------------------------------------------------
# Probes: fused q/k/v channels, unit residual adds
# ----------------------------------------------------------------------------------------------

class _Calls(TorchFunctionMode):
    """Keep the tensor arguments of chosen calls (by function name and occurrence), skipping calls made
    inside leaf modules, so that occurrences count exactly as the tracer's op nodes do."""

    def __init__(self, want: dict[str, set[int]]):
        super().__init__()
        self.want, self.count, self.got, self.depth = want, collections.Counter(), {}, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if self.depth == 0 and name in self.want:
            k = self.count[name]
            self.count[name] += 1
            if k in self.want[name]:
                self.got[(name, k)] = [a.detach().clone() for a in tree_flatten((args, kwargs))[0]
                                       if isinstance(a, torch.Tensor)]
        return out


def _occurrence(graph: DataflowGraph, idx: int) -> tuple[str, int]:
    n = graph.nodes[idx]
    k = sum(1 for m in graph.nodes[:idx] if m.kind == "op" and m.target == n.target and m.out_index == 0)
    return n.target, k


@torch.no_grad()
def _capture(model, ex: dict, want: dict[str, set[int]], hooks: dict[str, Any]) -> dict:
    from normsurgeon.dtype_context import default_dtype_for

    mode = _Calls(want)
    handles = []

    def enter(mod, args):
        mode.depth += 1

    def leave(mod, args, out):
        mode.depth -= 1

    for name, mod in model.named_modules():
        if name and is_leaf(mod):
            handles.append(mod.register_forward_pre_hook(enter))
            handles.append(mod.register_forward_hook(leave))
    for name, fn in hooks.items():  # registered last: they run after ``leave``, outside the mode's count
        handles.append(model.get_submodule(name).register_forward_hook(fn))
    try:
        with default_dtype_for(model), mode:
            model(**ex)
    finally:
        for h in handles:
            h.remove()
    return mode.got


def _probe_fused(model, graph: DataflowGraph, ex: dict, blocks: list[Block], tokens: int) -> None:
    """Map each fused projection's output channels to q / k / v heads: its output is replaced by
    ``s * (c + 1)`` and ``s * (c + 1.5)`` (c = channel) and read back at the attention op at position 0."""
    want: dict[str, set[int]] = collections.defaultdict(set)
    where: dict[tuple[int, str], tuple[str, int, int]] = {}
    fused_mods = set()
    for b in blocks:
        a = b.attention
        for role, (op, j, _) in a._graph_qkv.items():
            if list(a.proj.values()).count(a.proj[role]) > 1:
                name, k = _occurrence(graph, op)
                want[name].add(k)
                where[(b.index, role)] = (name, k, j)
                fused_mods.add(a.proj[role])
    dtype = next(model.parameters()).dtype
    cast = dtype not in (torch.float32, torch.float64)
    if cast:  # half / bfloat16 -> float32 -> back is lossless; channel numbers need the mantissa
        model.to(torch.float32)
    try:
        runs = []
        for shift in (1.0, 1.5):
            def index(mod, args, out, shift=shift):
                c = torch.arange(out.shape[-1], dtype=out.dtype, device=out.device) + shift
                return c.expand(out.shape).clone()
            runs.append(_capture(model, ex, want, {m: index for m in fused_mods}))
    except Exception as e:  # noqa: BLE001 - a model the probe cannot run: fused QK-norm is refused with the reason
        for b in blocks:
            b.attention.problem = f"the fused q/k/v probe failed ({type(e).__name__})"
        return
    finally:
        if cast:
            model.to(dtype)
    for b in blocks:
        a = b.attention
        chans: dict[str, list[list[int]]] = {}
        for role in ROLES:
            if (b.index, role) not in where:
                continue
            name, k, j = where[(b.index, role)]
            try:
                x1, x2 = runs[0][(name, k)][j], runs[1][(name, k)][j]
            except (KeyError, IndexError):
                a.problem = f"the attention op of `{a.scope}` was not seen in the probe"
                break
            heads = _decode(x1.double(), x2.double(), a.head_dims[role], tokens)
            if heads is None:
                a.problem = (f"the channels of the fused projection `{a.proj[role]}` could not be mapped to "
                             f"{role} heads (the attention transforms them before the attention op)")
                break
            chans[role] = heads
        else:
            mod = model.get_submodule(a.proj["q"])
            width = int(mod.weight.shape[1] if layout_of(mod) == "conv1d" else mod.weight.shape[0])
            fused_roles = [r for r in ROLES if r in chans]
            flat = [c for r in fused_roles for h in chans[r] for c in h]
            if len(flat) != len(set(flat)) or set(flat) != set(range(width)):
                a.problem = f"the q/k/v heads found in `{a.proj['q']}` do not partition its {width} outputs"
            else:
                a.channels = chans


def _decode(x1: torch.Tensor, x2: torch.Tensor, hd: int, tokens: int) -> list[list[int]] | None:
    """Channel numbers per head from the two probe values at position 0 (None when not clean)."""
    axes = [d for d, s in enumerate(x1.shape) if s == tokens]
    if len(axes) != 1 or hd <= 0:
        return None
    x1, x2 = x1.select(axes[0], 0), x2.select(axes[0], 0)
    if x1.shape[-1] != hd:
        return None
    s = 2.0 * (x2 - x1)
    if (s.abs() < 1e-12).any():
        return None
    c = x1 / s - 1.0
    r = c.round()
    if (c - r).abs().max() > 1e-3:
        return None
    heads: list[list[int]] = []
    for row in r.reshape(-1, hd).long().tolist():
        if row not in heads:  # repeated key/value heads (GQA, multi-query) count once
            heads.append(row)
    return heads


def first_tensor(out):
    """A module's output tensor (the first one of a tuple: MoE layers may also return router logits)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _check_residuals(model, ex: dict, blocks: list[Block], final: str) -> None:
    """Each group's output must be its input plus its writers' outputs (coefficient 1): the residual
    rewrites (Post-LN, DeepNorm, HybridNorm, embedding norm) replace a writer's output by ``new - x``."""
    from normsurgeon.dtype_context import default_dtype_for

    seen: dict[str, torch.Tensor] = {}
    handles = []

    def grab_in(name):
        def hook(mod, args):
            seen.setdefault("in:" + name, args[0].detach().double().clone())
        return hook

    def grab_out(name):
        def hook(mod, args, out):
            seen.setdefault("out:" + name, first_tensor(out).detach().double().clone())
        return hook

    firsts = [g[0].norm for b in blocks for g in b.groups] + [final]
    for n in dict.fromkeys(firsts):
        handles.append(model.get_submodule(n).register_forward_pre_hook(grab_in(n)))
    for b in blocks:
        for s in b.sublayers:
            handles.append(model.get_submodule(s.output).register_forward_hook(grab_out(s.output)))
    try:
        with default_dtype_for(model):
            model(**ex)
    finally:
        for h in handles:
            h.remove()
    p = next(model.parameters(), None)
    eps = max(torch.finfo(p.dtype).eps if p is not None and p.is_floating_point() else 1e-7, 1.2e-7)
    k = 0
    for b in blocks:
        for g in b.groups:
            k += 1
            x, nxt = seen.get("in:" + g[0].norm), seen.get("in:" + firsts[k])
            ys = [seen.get("out:" + s.output) for s in g]
            if x is None or nxt is None or any(y is None for y in ys) or any(y.shape != x.shape for y in ys):
                b.unit_residual, b.residual_problem = False, "its residual add could not be observed"
                continue
            # element by element, against the rounding of the model's own sum (bfloat16 checkpoints too)
            scale = x.abs() + sum(y.abs() for y in ys) + 1e-30
            if float(((nxt - x - sum(ys)).abs() / scale).max()) > 8 * eps:
                b.unit_residual = False
                b.residual_problem = (f"block `{b.name}` does not add its sublayers' outputs to the stream as they "
                                      f"are (scaled or gated residual)")
