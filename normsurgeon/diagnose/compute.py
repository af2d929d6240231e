"""``diagnose_model``: one hooked forward + backward pass over fixed token windows, then single-block
removal from cached states.

Per block: hidden-state moments and massive activations of the raw block output, gradient norms of
the whole block and of the FFN weights only (Xiong et al. / HybridNorm convention), the norm of
dL/d(block input), the loss change when the block is replaced by the identity, and the angular
distance matrix between all states (last token; Gromov et al., Mix-LN, LNS).

Cost: the stats pass is one forward + backward; removal re-runs only the blocks after the removed one
(earlier blocks replay cached states), so all removals together cost about L/2 forwards.

>>> import torch, transformers as T
>>> m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2))
>>> d = diagnose_model(m, torch.randint(0, 32, (2, 8)))
>>> len(d.layers), [round(x, 1) for x in d.angular[0][:1]]
(2, [0.0])
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import torch

from normsurgeon.diagnose.blocks import ffn_module, find_block_list
from normsurgeon.diagnose.stats import StateStats, angular_distance_matrix


@dataclasses.dataclass
class Diagnosis:
    model_class: str
    block_path: str
    num_layers: int
    num_sequences: int
    seq_len: int
    loss: float  # mean next-token cross-entropy (nats/token) over all windows
    embedding: dict[str, Any]  # stats of state 0 (the block-0 input)
    layers: list[dict[str, Any]]  # one per block, 1-based "layer"
    angular: list[list[float]]  # [L+1, L+1]: states 0..L
    settings: dict[str, Any]
    timings: dict[str, float]
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    spikes: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ce_sum(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of ids [b, T] (float32 logits)."""
    logits = model(input_ids=ids, use_cache=False).logits  # [b, T, V]
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])  # [b*(T-1), V]
    pred = pred if pred.dtype in (torch.float32, torch.float64) else pred.float()
    return torch.nn.functional.cross_entropy(pred, ids[:, 1:].reshape(-1), reduction="sum")


def diagnose_model(model: torch.nn.Module, ids: torch.Tensor, *, micro_batch: int = 2, grads: bool = True,
                   removal: bool = True, removal_sequences: int | None = None, grad_sequences: int | None = None,
                   say: Callable[[str], None] | None = None) -> Diagnosis:
    """Diagnose ``model`` on token windows ``ids`` [n, T]. ``removal_sequences``: how many of the windows
    the layer-removal losses use, ``grad_sequences``: how many the gradient norms use (default all; the
    first windows; fewer = proportionally cheaper backward and removal passes)."""
    say = say or (lambda msg: None)
    path, blocks = find_block_list(model)
    n_layers = len(blocks)
    model.eval()
    n, seq_len = ids.shape
    n_removal = n if removal_sequences is None else max(1, min(n, removal_sequences))
    n_grad = n if grad_sequences is None else max(1, min(n, grad_sequences))
    stats = [StateStats() for _ in range(n_layers + 1)]
    grad_in_sq = [0.0] * n_layers
    block_params = {id(p) for p in blocks.parameters()}
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # only block gradients are needed: skip the embedding/head weight grads
        p.requires_grad_(grads and id(p) in block_params)
        p.grad = None
    cache: list[list[torch.Tensor]] = []  # per removal micro-batch: states 0..L-1 (detached)
    base_ce: list[float] = []
    out_shape: list = [None]  # how a block returns its hidden state: (container type, length) or None (bare)
    current: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def pre_hook(i: int):
        def fn(mod, args, kwargs):
            if args:
                h, rest, key = args[0], args[1:], None
            else:
                h, rest, key = kwargs["hidden_states"], args, "hidden_states"
            if i == 0:
                stats[0].update(h, current["offset"])
            if current["keep"]:
                current["states"].append(h.detach())
            if grads and torch.is_grad_enabled():
                if not h.requires_grad:
                    h = h.detach().requires_grad_(True)
                h.register_hook(lambda g, i=i: grad_in_sq.__setitem__(i, grad_in_sq[i] + float(g.double().pow(2).sum())))
            if key is None:
                return (h, *rest), kwargs
            kwargs = dict(kwargs, hidden_states=h)
            return rest, kwargs
        return fn

    def post_hook(i: int):
        def fn(mod, args, kwargs, out):
            h = out[0] if isinstance(out, (tuple, list)) else out  # OpenAI GPT's blocks return a list
            out_shape[0] = (type(out), len(out)) if isinstance(out, (tuple, list)) else None
            stats[i + 1].update(h, current["offset"])
        return fn

    handles = []
    for i, blk in enumerate(blocks):
        handles.append(blk.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(blk.register_forward_hook(post_hook(i), with_kwargs=True))
    t0 = time.perf_counter()
    total_ce, count = 0.0, 0
    n_pred = n_grad * (seq_len - 1)
    try:
        for start in range(0, n, micro_batch):
            mb = ids[start:start + micro_batch]  # [b, T]
            current.update(offset=start, keep=removal and start < n_removal, states=[])
            with_grad = grads and start < n_grad
            with torch.set_grad_enabled(with_grad):
                ce = _ce_sum(model, mb)
                if with_grad:
                    (ce / n_pred).backward()
            total_ce += float(ce.detach())
            count += mb.shape[0] * (seq_len - 1)
            if current["keep"]:
                cache.append(current["states"])
                base_ce.append(float(ce.detach()))
            say(f"stats pass: {min(start + micro_batch, n)}/{n} sequences")
    finally:
        for h in handles:
            h.remove()
    timings["stats_pass_s"] = time.perf_counter() - t0

    layers: list[dict[str, Any]] = []
    for i, blk in enumerate(blocks):
        entry: dict[str, Any] = {"layer": i + 1, **stats[i + 1].result()}
        if grads:
            g_all = [p.grad for p in blk.parameters() if p.grad is not None]
            ffn = ffn_module(blk)
            g_ffn = [p.grad for p in ffn.parameters() if p.grad is not None and p.dim() >= 2] if ffn is not None else []
            entry["grad_norm_block"] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in g_all))
            entry["grad_norm_ffn"] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in g_ffn)) if g_ffn else None
            entry["grad_norm_input"] = math.sqrt(grad_in_sq[i])  # ||dL/d(block input)||, all tokens
        layers.append(entry)
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(saved_flags[id(p)])

    if removal:
        t1 = time.perf_counter()
        base = sum(base_ce)
        n_tok = n_removal * (seq_len - 1)
        for k in range(n_layers):
            ce_k = 0.0
            for states, start in zip(cache, range(0, n_removal, micro_batch)):
                mb = ids[start:start + micro_batch]
                ce_k += float(_without_block(model, blocks, k, states[k], out_shape[0], mb))
            layers[k]["removal_delta_loss"] = (ce_k - base) / n_tok
            say(f"layer removal: {k + 1}/{n_layers}")
        timings["removal_s"] = time.perf_counter() - t1

    angular = angular_distance_matrix([s.last_tokens() for s in stats])  # [L+1, L+1]
    diag = Diagnosis(type(model).__name__, path, n_layers, n, seq_len, total_ce / count, stats[0].result(), layers,
                     angular.tolist(), {"micro_batch": micro_batch, "grads": grads, "removal": removal,
                                        "removal_sequences": n_removal if removal else 0,
                                        "grad_sequences": n_grad if grads else 0}, timings)
    diag.summary = summarize(diag)
    return diag


@torch.no_grad()
def _without_block(model, blocks, k: int, state_k: torch.Tensor, out_shape, mb: torch.Tensor) -> torch.Tensor:
    """Summed CE with block ``k`` replaced by the identity: blocks 0..k replay the cached input of block k.
    ``out_shape``: (tuple or list, length) when the blocks return a container, None for a bare tensor."""
    def wrap(h):
        if out_shape is None:
            return h
        kind, n = out_shape
        return kind([h] + [None] * (n - 1))

    def replay(*args, **kwargs):
        return wrap(state_k)

    def passthrough(*args, **kwargs):
        return wrap(args[0] if args else kwargs["hidden_states"])

    for j in range(k + 1):
        blocks[j].forward = replay if j == 0 else passthrough
    try:
        return _ce_sum(model, mb)
    finally:
        for j in range(k + 1):
            del blocks[j].forward


def summarize(d: Diagnosis) -> dict[str, Any]:
    """The headline ratios used in docs/placement.md (same definitions as the research pilot)."""
    L = d.num_layers
    first, last = d.layers[0], d.layers[-1]
    out: dict[str, Any] = {
        "second_moment_last_over_first": last["second_moment"] / first["second_moment"],
        "max_massive_ratio": max(x["massive_ratio"] for x in d.layers),
        "max_massive_layer": max(d.layers, key=lambda x: x["massive_ratio"])["layer"],
    }
    if "grad_norm_block" in first:
        gn = [x["grad_norm_block"] for x in d.layers]
        out["grad_norm_max_over_min"] = max(gn) / max(min(gn), 1e-30)
        out["grad_norm_first_over_last"] = gn[0] / max(gn[-1], 1e-30)
        ffn = [x["grad_norm_ffn"] for x in d.layers if x.get("grad_norm_ffn") is not None]
        if len(ffn) == L:
            out["ffn_grad_norm_max_over_min"] = max(ffn) / max(min(ffn), 1e-30)
            mean = sum(ffn) / L
            out["ffn_grad_norm_cv"] = math.sqrt(sum((g - mean) ** 2 for g in ffn) / L) / mean if mean else None
    consecutive = [d.angular[i][i + 1] for i in range(1, L)]  # block i's output vs block i+1's output
    if L >= 2:
        half = max(1, len(consecutive) // 2)
        shallow, deep = consecutive[:half], consecutive[half:] or consecutive[-1:]
        out["angular_deep_over_shallow"] = (sum(deep) / len(deep)) / max(sum(shallow) / len(shallow), 1e-30)
    if "removal_delta_loss" in first:
        drops = [x["removal_delta_loss"] for x in d.layers]
        out["removal_mean_deep_half"] = sum(drops[L // 2:]) / len(drops[L // 2:])
        out["removal_mean_shallow_half"] = sum(drops[:L // 2]) / max(1, len(drops[:L // 2]))
        out["least_important_layer"] = 1 + min(range(L), key=lambda i: drops[i])
    return out
