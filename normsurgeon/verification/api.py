"""``verify(source, converted)``: load both, run them on the same inputs, judge per dtype.

>>> import tempfile, pathlib
>>> from normsurgeon.conversion import convert
>>> out = pathlib.Path(tempfile.mkdtemp()) / "rms"
>>> _ = convert("normsurgeon.testing:tiny_gpt2", out, to="rmsnorm", run_verify=False)
>>> verify("normsurgeon.testing:tiny_gpt2", str(out))["status"]
'pass'
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from normsurgeon.io.loader import LoadedModel, load_model
from normsurgeon.verification.inputs import default_batches
from normsurgeon.verification.metrics import THRESHOLDS, dtype_name, judge
from normsurgeon.verification.report import SCHEMA, status_of
from normsurgeon.verification.runner import compare_models, logprob_gap


def compute_dtype_for(stored: torch.dtype) -> torch.dtype:
    """float64 checkpoints are checked in float64; everything else in float32 (half types upcast on CPU)."""
    return torch.float64 if stored == torch.float64 else torch.float32


def verify_loaded(src: LoadedModel, conv: LoadedModel, *, num: int = 4, seq_len: int = 64, seed: int = 0,
                  text_file: Path | None = None, image_dir: Path | None = None, roundoff: bool = True) -> dict:
    """Compare two loaded models (both are cast in place to the compute dtype)."""
    t0 = time.perf_counter()
    stored = dtype_name(conv.dtype)
    compute = compute_dtype_for(conv.dtype)
    batches = default_batches(src.model, src.path, num=num, seq_len=seq_len, seed=seed, text_file=text_file,
                              image_dir=image_dir)
    points = list((conv.converted or {}).get("rmsnorm", {}))
    margin = 2 * THRESHOLDS.get(stored, THRESHOLDS["float32"])["max_abs_logprob"]
    truth = copy.deepcopy(src.model).to(torch.float64) if compute != torch.float64 and roundoff else None
    result = compare_models(src.model, conv.model, batches, compute, points, margin)
    if truth is not None:
        # For scale: how far the source itself is from its own float64 evaluation on these inputs.
        try:
            result["metrics"]["source_roundoff_logprob"] = logprob_gap(truth, src.model, batches)
        except RuntimeError:  # a kernel without a float64 version (PhiMoE's experts): no round-off scale
            result["metrics"]["source_roundoff_logprob"] = None
    metrics = judge(result["metrics"], stored)
    worst = max(result["per_layer"], key=lambda p: p["resid_rel_l2"], default=None)
    return {
        "schema": SCHEMA,
        "status": status_of(metrics),
        "source": {"ref": src.ref, "architecture": type(src.model).__name__, "dtype": dtype_name(src.dtype)},
        "output": {"path": conv.ref, "dtype": stored, "loaded_as": type(conv.model).__name__},
        "inputs": {"description": _describe(batches, text_file, image_dir, seed), "positions": result["positions"],
                   "compute_dtype": dtype_name(compute)},
        "metrics": metrics,
        "worst_residual_point": worst,
        "per_layer": result["per_layer"],
        "timing_s": {"verify": round(time.perf_counter() - t0, 3)},
    }


def _describe(batches, text_file, image_dir, seed) -> str:
    shapes = " + ".join("x".join(map(str, next(iter(b.values())).shape)) for b in batches)
    src = f"text {text_file}" if text_file else f"images {image_dir}" if image_dir else f"built-in (seed {seed})"
    return f"{src}: {shapes}"


def verify(source: str, converted: str, *, stock: bool = False, num: int = 4, seq_len: int = 64, seed: int = 0,
           text_file: Path | None = None, image_dir: Path | None = None, allow_pickle: bool = False,
           trust_remote_code: bool = False) -> dict:
    """Load ``source`` and ``converted`` and return the equivalence report (a dict).

    ``stock=True`` loads the converted folder with the plain Hugging Face class instead of normsurgeon.
    """
    src = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    conv = load_model(converted, stock=stock, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return verify_loaded(src, conv, num=num, seq_len=seq_len, seed=seed, text_file=text_file, image_dir=image_dir)
