"""Verify a conversion without holding either model: one block of one model in memory at a time.

Both models are built on ``meta`` (buffers real). A forward pre-hook on every *unit* (each block of
the ModuleLists, and every other module that owns parameters) reads that unit's tensors from the
safetensors files (``os.pread``, cast to the compute dtype); a forward hook drops them again. The
source runs first and its block inputs/outputs are kept (activations only); the converted model then
runs on the same tokens, and at each block we report

- ``resid_rel_l2``: its output stream against the source's (centred) output stream, accumulated error;
- ``local_rel_l2``: the converted block run on the source's own (centred) input, against the source's
  output: the error this block adds by itself, which localises a bad fold.

Memory: about one block in the compute dtype plus the activations of all blocks.

>>> import tempfile, pathlib
>>> from normsurgeon.testing import tiny_gpt2
>>> from normsurgeon.conversion import convert
>>> d = pathlib.Path(tempfile.mkdtemp()); tiny_gpt2().save_pretrained(d / "src")
>>> _ = convert(str(d / "src"), d / "out", run_verify=False)
>>> r = verify_layerwise(d / "src", d / "out")
>>> r["status"], len(r["per_layer"])
('pass', 2)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from normsurgeon.errors import UnsupportedModel
from normsurgeon.stream.malloc_tuning import tune_malloc
from normsurgeon.stream.skeleton import block_lists
from normsurgeon.verification.lazy import LazyUnsupported, LazyWeights, skeleton as _skeleton, stored_dtype
from normsurgeon.verification.inputs import default_batches
from normsurgeon.verification.metrics import (THRESHOLDS, compute_dtype_for, dtype_name, judge, output_metrics,
                                              residual_error)
from normsurgeon.verification.report import SCHEMA, status_of


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    for attr in ("last_hidden_state", "hidden_states"):
        t = getattr(x, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(f"cannot find the hidden states in a block's {type(x).__name__}")


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _one_batch(batches: list[dict]) -> dict:
    """All sequences as one batch (token batches trimmed to the shortest length)."""
    if len(batches) == 1:
        return batches[0]
    key = next(iter(batches[0]))
    if key != "input_ids":
        return batches[0]
    n = min(b[key].shape[1] for b in batches)
    return {key: torch.cat([b[key][:, :n] for b in batches])}


def _rel_l2(src: torch.Tensor, conv: torch.Tensor) -> float:
    """``resid_rel_l2`` of ``verify.metrics.residual_error`` (float64, source centred, width of ``conv``)
    without the cosine it also computes, which costs more than the norm.

    >>> x = torch.randn(2, 3, 8, dtype=torch.float64)
    >>> abs(_rel_l2(x, x - x.mean(-1, keepdim=True))) < 1e-12
    True
    """
    s = src.double()
    s = (s - s.mean(-1, keepdim=True))[..., : conv.shape[-1]]
    return ((s - conv.double()).norm() / s.norm().clamp_min(1e-30)).item()


def _output_tensor(out: Any) -> torch.Tensor:
    from normsurgeon.verification.runner import _output_tensor as get

    return get(out)


def verify_layerwise(source: str | Path, converted: str | Path, *, num: int = 4, seq_len: int = 64, seed: int = 0,
                     text_file: Path | None = None, progress: Callable[..., None] | None = None) -> dict:
    """Compare ``converted`` with ``source`` block by block; return an equivalence report (a dict).

    ``progress("verify (layer by layer)", blocks run, 2 x blocks, unit="block")``: each block of the source's
    pass, then of the converted model's."""
    tune_malloc()  # predictable resident memory (stream/malloc_tuning.py)
    t0 = time.perf_counter()
    source, converted = Path(source), Path(converted)
    src, _, src_index = _skeleton(source)
    conv, conv_cfg, conv_index = _skeleton(converted)
    stored = stored_dtype(conv_index)
    compute = compute_dtype_for(stored)
    src.to(compute)
    conv.to(compute)
    batch = _one_batch(default_batches(src, source, num=num, seq_len=seq_len, seed=seed, text_file=text_file))
    batch = {k: (v.to(compute) if v.is_floating_point() else v) for k, v in batch.items()}
    extra = {"use_cache": False} if "input_ids" in batch else {}

    src_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    blocks_run, n_blocks = [0], sum(block_lists(src).values())

    def tick() -> None:
        blocks_run[0] += 1
        if progress is not None:
            progress("verify (layer by layer)", min(blocks_run[0], 2 * n_blocks), 2 * n_blocks, unit="block")

    def keep(name, m, args, kwargs, output):
        src_io[name] = (_hidden_in(args, kwargs).detach().clone(), _first_tensor(output).detach().clone())
        tick()

    lazy_src = LazyWeights(src, src_index)
    try:
        with lazy_src.attached(keep), torch.no_grad():
            s_out = _output_tensor(src(**batch, **extra)).detach()
        lazy_conv = LazyWeights(conv, conv_index)
        per_layer = []

        def compare(name, m, args, kwargs, output):
            if name not in src_io:
                return
            s_in, s_out_block = src_io.pop(name)
            c_out = _first_tensor(output)
            stream = residual_error(s_out_block, c_out)
            width = _hidden_in(args, kwargs).shape[-1]
            s_in64 = s_in.double()
            centred = (s_in64 - s_in64.mean(-1, keepdim=True))[..., :width].to(s_in.dtype)
            a, k = _with_hidden(args, kwargs, centred)
            lazy_conv._inner = True
            try:
                local_out = _first_tensor(m(*a, **k))
            finally:
                lazy_conv._inner = False
            per_layer.append({"point": name, **stream, "local_rel_l2": _rel_l2(s_out_block, local_out)})
            tick()

        with lazy_conv.attached(compare), torch.no_grad():
            c_out = _output_tensor(conv(**batch, **extra)).detach()
    except LazyUnsupported as e:
        raise UnsupportedModel(f"layer-by-layer verification: {e}; use whole-model verification") from None
    sname = dtype_name(stored)
    margin = 2 * THRESHOLDS.get(sname, THRESHOLDS["float32"])["max_abs_logprob"]
    m = output_metrics(s_out, c_out, margin)
    positions = m.pop("positions")
    metrics = judge(m, sname)
    worst = max(per_layer, key=lambda p: p["resid_rel_l2"], default=None)
    return {
        "schema": SCHEMA,
        "status": status_of(metrics),
        "source": {"ref": str(source), "architecture": type(src).__name__},
        "output": {"path": str(converted), "dtype": sname, "loaded_as": type(conv).__name__},
        "inputs": {"description": f"layer by layer, one batch {'x'.join(map(str, next(iter(batch.values())).shape))}"
                                  f" (seed {seed})", "positions": positions, "compute_dtype": dtype_name(compute)},
        "metrics": metrics,
        "worst_residual_point": worst,
        "per_layer": per_layer,
        "layerwise": {"bytes_read": lazy_src.loaded_bytes + lazy_conv.loaded_bytes},
        "timing_s": {"verify": round(time.perf_counter() - t0, 3)},
    }
