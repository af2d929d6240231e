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

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.graph.anatomy import ATTENTION_OPS, attention_cores, qkv_nodes, reach_until, residual_dropout
from normsurgeon.graph.layouts import layout_of
from normsurgeon.graph.probe import first_tensor
from normsurgeon.graph.trace import DataflowGraph
from normsurgeon.placement.parts import Anatomy, Attention, Block, Sublayer
from normsurgeon.placement.probes import check_residuals, probe_fused

__all__ = ["Anatomy", "Attention", "Block", "Sublayer", "find_anatomy", "first_tensor"]  # parts re-exported

PROBE_TOKENS = 7  # the trace's sequence length: a prime, so that the token axis is told from heads and head widths


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

    core = attention_cores(graph)
    per_block: dict[str, list[tuple[list, list[str]]]] = {}
    for k, g in enumerate(groups):
        new = sorted(atoms[k + 1] - atoms[k], key=lambda w: node_of.get(w, -1))
        per_block.setdefault(g[0].block, []).append((g, new))

    blocks: list[Block] = []
    for i, (bname, gs) in enumerate(per_block.items()):
        blocks.append(_block(i, bname, gs, graph, nm, node_of, writers, stream_nodes, core, tokens))

    fused = [b for b in blocks if b.attention is not None and b.attention.fused and b.attention.problem is None]
    if fused:
        probe_fused(model, graph, ex, fused, tokens)
    check_residuals(model, ex, blocks, final.name)
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
        reach = {r: reach_until(graph, node_of[r], stream_nodes) for _, r in readers if r in node_of}
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
                                 residual_dropout(graph, node_of[w]) if w in node_of else 0.0,
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


def _attention(graph, nm, node_of, stream_nodes, attn: Sublayer, core: int, tokens: int) -> Attention:
    c = graph.nodes[core]
    op = "scaled_dot_product_attention" if c.target in ATTENTION_OPS else "softmax"
    a = Attention(c.scope, op, {}, {})
    qkv = qkv_nodes(graph, core)
    if qkv is None:
        a.problem = f"the attention op in `{c.scope}` has no recognisable query, key and value inputs"
        return a
    reach = {r: reach_until(graph, node_of[r], stream_nodes) for r in attn.readers}
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
        down = reach_until(graph, idx, stream_nodes) | {idx}
        hit = [role for role, (_, _, node) in qkv.items() if node in down]
        if len(hit) == 1:
            a.native_norms[hit[0]] = n.name
    a._graph_qkv = qkv  # graph positions, for the fused-channel probe (not part of the anatomy's data)
    return a
