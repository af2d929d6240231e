"""``verify(source, converted)``: load both, run them on the same inputs, judge per dtype.

>>> import tempfile, pathlib
>>> from normsurgeon.conversion import convert
>>> out = pathlib.Path(tempfile.mkdtemp()) / "rms"
>>> _ = convert("normsurgeon.testing:tiny_gpt2", out, to="rmsnorm", run_verify=False)
>>> verify("normsurgeon.testing:tiny_gpt2", str(out))["status"]
'pass'
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from normsurgeon.io.loader import LoadedModel, load_model
from normsurgeon.verification.inputs import default_batches
from normsurgeon.verification.metrics import THRESHOLDS, cast_thresholds, compute_dtype_for, dtype_name, judge
from normsurgeon.verification.report import SCHEMA, status_of
from normsurgeon.verification.runner import compare_models


def verify_loaded(src: LoadedModel, conv: LoadedModel, *, num: int = 4, seq_len: int = 64, seed: int = 0,
                  text_file: Path | None = None, image_dir: Path | None = None, roundoff: bool = True,
                  max_logprob_delta: float | None = None) -> dict:
    """Compare two loaded models (both are cast in place to the compute dtype).

    When the output is stored in a lower precision than the source, the cast's own error (the source's
    weights rounded to that dtype vs the source) is measured and reported under ``cast``, and the
    conversion is judged against it (``metrics.cast_thresholds``). ``max_logprob_delta``: an explicit
    threshold for max |delta log-prob|, recorded in the report.
    """
    t0 = time.perf_counter()
    stored = dtype_name(conv.dtype)
    compute = compute_dtype_for(conv.dtype)
    batches = default_batches(src.model, src.path, num=num, seq_len=seq_len, seed=seed, text_file=text_file,
                              image_dir=image_dir)
    points = list((conv.converted or {}).get("rmsnorm", {}))
    margin = 2 * THRESHOLDS.get(stored, THRESHOLDS["float32"])["max_abs_logprob"]
    judged_as, note = stored, None
    checks = dict(roundoff=roundoff and compute != torch.float64,
                  cast_to=conv.dtype if _lower_precision(conv.dtype, src.dtype) else None)
    try:
        result = compare_models(src.model, conv.model, batches, compute, points, margin, **checks)
    except RuntimeError as e:
        if compute != torch.float64 or not _no_float64_kernel(e):
            raise
        # A kernel without a float64 version (grouped expert matmuls): check in float32, at float32's threshold.
        compute, judged_as = torch.float32, "float32"
        note = f"checked in float32 at float32's thresholds: {str(e).splitlines()[0][:120]}"
        margin = 2 * THRESHOLDS["float32"]["max_abs_logprob"]
        checks["roundoff"] = roundoff
        result = compare_models(src.model, conv.model, batches, compute, points, margin, **checks)
    if "source_roundoff" in result:
        # For scale: how far the source itself is from its own float64 evaluation on these inputs.
        result["metrics"]["source_roundoff_logprob"] = result["source_roundoff"]
    cast = result.get("cast")
    thresholds = cast_thresholds(stored, cast) if cast is not None else {}
    if max_logprob_delta is not None:
        thresholds["max_abs_logprob"] = max_logprob_delta
    metrics = judge(result["metrics"], judged_as, thresholds)
    worst = max(result["per_layer"], key=lambda p: p["resid_rel_l2"], default=None)
    return {
        "schema": SCHEMA,
        "status": status_of(metrics),
        "source": {"ref": src.ref, "architecture": type(src.model).__name__, "dtype": dtype_name(src.dtype)},
        "output": {"path": conv.ref, "dtype": stored, "loaded_as": type(conv.model).__name__},
        "inputs": {"description": _describe(batches, text_file, image_dir, seed), "positions": result["positions"],
                   "compute_dtype": dtype_name(compute), **({"compute_note": note} if note else {})},
        "metrics": metrics,
        **({"cast": {"dtype": stored, "from": dtype_name(src.dtype), "metrics": cast,
                     "rule": "thresholds are the dtype's own or twice the cast's own error, whichever is looser"}}
           if cast is not None else {}),
        **({"explicit_threshold": {"max_abs_logprob": max_logprob_delta}} if max_logprob_delta is not None else {}),
        "worst_residual_point": worst,
        "per_layer": result["per_layer"],
        "timing_s": {"verify": round(time.perf_counter() - t0, 3)},
    }


def _no_float64_kernel(e: RuntimeError) -> bool:
    text = str(e)
    return any(w in text for w in ("Double", "double", "float64"))


def _lower_precision(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether floating dtype ``a`` holds fewer mantissa bits than ``b`` (a lossy cast from b to a)."""
    return a.is_floating_point and b.is_floating_point and torch.finfo(a).eps > torch.finfo(b).eps


def _describe(batches, text_file, image_dir, seed) -> str:
    shapes = " + ".join("x".join(map(str, next(iter(b.values())).shape)) for b in batches)
    src = f"text {text_file}" if text_file else f"images {image_dir}" if image_dir else f"built-in (seed {seed})"
    return f"{src}: {shapes}"


def verify(source: str, converted: str, *, stock: bool = False, num: int = 4, seq_len: int = 64, seed: int = 0,
           text_file: Path | None = None, image_dir: Path | None = None, allow_pickle: bool = False,
           trust_remote_code: bool = False, max_logprob_delta: float | None = None) -> dict:
    """Load ``source`` and ``converted`` and return the equivalence report (a dict).

    ``stock=True`` loads the converted folder with the plain Hugging Face class instead of normsurgeon.
    """
    src = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return verify_against(src, converted, stock=stock, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                          num=num, seq_len=seq_len, seed=seed, text_file=text_file, image_dir=image_dir,
                          max_logprob_delta=max_logprob_delta)


def verify_against(src: LoadedModel, converted: str | Path, *, stock: bool = False, allow_pickle: bool = False,
                   trust_remote_code: bool = False, **kw) -> dict:
    """``verify_loaded`` of the loaded source against ``converted``. A local safetensors folder (a plain
    checkpoint or a ``convert`` output) runs unit by unit, each block read from its shards as it runs
    (``verification/lazy.py``); anything else, or a model that cannot run that way, is loaded whole.
    ``output.loaded`` in the report says which."""
    from normsurgeon.verification.lazy import LazyUnsupported, lazy_output

    reason = "not a local folder"
    if Path(converted).is_dir() and not trust_remote_code:
        try:
            with lazy_output(Path(converted), stock=stock) as conv:
                report = verify_loaded(src, conv, **kw)
            report["output"]["loaded"] = "unit by unit"
            return report
        except LazyUnsupported as e:
            reason = str(e)
    conv = load_model(str(converted), stock=stock, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    report = verify_loaded(src, conv, **kw)
    report["output"]["loaded"] = f"whole ({reason})"
    return report
