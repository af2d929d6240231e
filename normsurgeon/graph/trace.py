"""Record a model's dataflow by running it once on a tiny input.

We do not trust module names: a norm's readers and the residual stream's writers are found from the
tensors that actually flow between modules. ``trace_dataflow`` runs the model eagerly under a
``TorchFunctionMode`` and records, outside of "leaf" modules, every torch function call; leaf modules
(Linear, Conv, Embedding, norms, ...) are recorded as single opaque nodes through forward hooks.

Eager recording works for any model that runs (no ``torch.export`` restrictions on data-dependent
control flow, caches or custom kernels); the price is that the graph holds only the path taken for
this input, which is why callers use a plain forward pass without cache.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
>>> g = trace_dataflow(m, (torch.randn(2, 4),))
>>> [n.target for n in g.nodes if n.kind == "module"]
['0', '1']
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from normsurgeon.dtype_context import default_dtype_for

# Module types recorded as one opaque node. Everything with parameters of its own and no children is a
# leaf too (see ``is_leaf``), so custom norm classes and HF's GPT-2 ``Conv1D`` are covered without a list.
_ALWAYS_LEAF = (
    torch.nn.Linear,
    torch.nn.Embedding,
    torch.nn.modules.conv._ConvNd,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.Dropout,
)


def is_leaf(module: torch.nn.Module) -> bool:
    """A module recorded as one node: a known layer type, or a module with own parameters and no children."""
    if isinstance(module, _ALWAYS_LEAF):
        return True
    has_children = next(iter(module.children()), None) is not None
    has_params = next(iter(module.parameters(recurse=False)), None) is not None
    return has_params and not has_children


@dataclasses.dataclass
class Node:
    """One tensor-producing event.

    kind: "input" (a tensor passed to the model), "param" (a parameter or buffer read outside a leaf
    module), "module" (a leaf module call; ``target`` is its qualified name), "op" (a torch function;
    ``target`` is its name), "external" (a tensor of unknown origin, e.g. a constant).
    ``inputs`` lists the producer node indices of the tensor arguments in call order; ``scalars`` keeps
    the non-tensor arguments (dims, sizes, numbers) for the analysis of transparent ops.
    """

    idx: int
    kind: str
    target: str
    inputs: list[int]
    shape: tuple[int, ...]
    dtype: torch.dtype
    scalars: list[Any] = dataclasses.field(default_factory=list)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    out_index: int = 0
    arg_kinds: list[str] = dataclasses.field(default_factory=list)  # "t" tensor or "s" scalar, in order
    scope: str = ""  # for ops: the innermost (non-leaf) module whose forward was running

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


@dataclasses.dataclass
class DataflowGraph:
    """The recorded nodes, the consumers of each node and the node indices of the model outputs."""

    nodes: list[Node]
    users: dict[int, list[int]]
    outputs: list[int]
    modules: dict[str, torch.nn.Module]

    def module_nodes(self, name: str) -> list[Node]:
        return [n for n in self.nodes if n.kind == "module" and n.target == name]

    def consumers(self, idx: int) -> list[Node]:
        return [self.nodes[u] for u in self.users.get(idx, [])]


class _Recorder(TorchFunctionMode):
    def __init__(self, param_names: dict[int, str]):
        super().__init__()
        self.nodes: list[Node] = []
        self.producer: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids stable for the whole trace
        self.param_names = param_names
        self.depth = 0
        self.scope: list[str] = []

    # -- bookkeeping -------------------------------------------------------------------------
    def _new(self, kind: str, target: str, inputs: list[int], t: torch.Tensor, **extra) -> int:
        node = Node(len(self.nodes), kind, target, inputs, tuple(t.shape), t.dtype, **extra)
        self.nodes.append(node)
        self.producer[id(t)] = node.idx
        self.keep.append(t)
        return node.idx

    def source_of(self, t: torch.Tensor) -> int:
        idx = self.producer.get(id(t))
        if idx is not None:
            return idx
        name = self.param_names.get(id(t))
        if name is not None:
            return self._new("param", name, [], t)
        return self._new("external", "", [], t)

    def record_input(self, name: str, t: torch.Tensor) -> None:
        self._new("input", name, [], t)

    # -- torch function interception ---------------------------------------------------------
    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth > 0:
            return out
        name = getattr(func, "__name__", str(func))
        if name in ("__get__", "size", "dim", "numel", "__len__", "__bool__", "item", "tolist", "is_floating_point"):
            return out
        flat_args, _ = tree_flatten((args, kwargs))
        in_ids, scalars, kinds = [], [], []
        for a in flat_args:
            if isinstance(a, torch.Tensor):
                in_ids.append(self.source_of(a))
                kinds.append("t")
            else:
                scalars.append(a)
                kinds.append("s")
        flat_out, _ = tree_flatten(out)
        small_kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        for i, o in enumerate(flat_out):
            if isinstance(o, torch.Tensor):
                self._new("op", name, list(in_ids), o, scalars=list(scalars), kwargs=small_kwargs,
                          out_index=i, arg_kinds=list(kinds), scope=self.scope[-1] if self.scope else "")
        return out


def trace_dataflow(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> DataflowGraph:
    """Run ``model(*args, **kwargs)`` once and return its recorded dataflow graph.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    >>> g = trace_dataflow(m, (torch.randn(1, 3),))
    >>> [(n.kind, n.target) for n in g.nodes]
    [('input', 'arg0'), ('module', '0'), ('op', 'relu')]
    """
    kwargs = kwargs or {}
    names = {name: mod for name, mod in model.named_modules()}
    param_names: dict[int, str] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), pname)
    for bname, b in model.named_buffers(remove_duplicate=False):
        param_names.setdefault(id(b), bname)

    rec = _Recorder(param_names)
    hooks = []
    leaf_names = {mod: name for name, mod in names.items() if name and is_leaf(mod)}

    def pre_hook(mod, inputs):
        rec.depth += 1

    def post_hook(mod, inputs, output):
        rec.depth -= 1
        if rec.depth > 0:
            return
        in_ids = [rec.source_of(t) for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
        for i, o in enumerate(tree_flatten(output)[0]):
            if isinstance(o, torch.Tensor):
                rec._new("module", leaf_names[mod], in_ids, o, out_index=i)

    for mod in leaf_names:
        hooks.append(mod.register_forward_pre_hook(pre_hook))
        hooks.append(mod.register_forward_hook(post_hook))
    def enter(name: str):
        def hook(mod, inputs) -> None:
            rec.scope.append(name)
        return hook

    def leave(mod, inputs, output) -> None:
        rec.scope.pop()

    for name, mod in names.items():  # the scope of each op: which module's forward it ran in
        if name and mod not in leaf_names:
            hooks.append(mod.register_forward_pre_hook(enter(name)))
            hooks.append(mod.register_forward_hook(leave))
    try:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                rec.record_input(f"arg{i}", a)
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                rec.record_input(k, v)
        with torch.no_grad(), default_dtype_for(model), rec:
            out = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    out_ids = [rec.producer[id(o)] for o in _flatten_outputs(out) if id(o) in rec.producer]
    users: dict[int, list[int]] = {}
    for n in rec.nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n.idx)
    return DataflowGraph(rec.nodes, users, out_ids, names)


def _flatten_outputs(out: Any) -> Iterable[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
