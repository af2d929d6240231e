"""Verify a checkpoint a conversion has just written, against the source already in memory.

The written model is not loaded whole: it runs unit by unit, each block's tensors read from the new
shards just before it runs (``verification/lazy.py``), so the verification holds the source plus about
one block of the output. A model that cannot run that way is loaded whole instead (``loaded`` in the
report says which).

>>> import tempfile, pathlib
>>> from normsurgeon.conversion import convert
>>> from normsurgeon.io.loader import load_model
>>> from normsurgeon.recipes import recipe_for_target
>>> out = pathlib.Path(tempfile.mkdtemp()) / "rms"
>>> _ = convert("normsurgeon.testing:tiny_gpt2", out, run_verify=False)
>>> r = verify_written(load_model("normsurgeon.testing:tiny_gpt2"), out, True, recipe_for_target("rmsnorm").verify)
>>> r["status"], r["stock_load"]["status"], r["output"]["loaded"]
('pass', 'pass', 'unit by unit')
"""
from __future__ import annotations

from pathlib import Path

from normsurgeon.io.loader import LoadedModel
from normsurgeon.verification.api import verify_against


def verify_written(src: LoadedModel, folder: Path, stock_loadable: bool, settings, text_file: Path | None = None,
                   max_logprob_delta: float | None = None) -> dict:
    """Verify the checkpoint written to ``folder`` against the loaded source (reused, not reloaded).

    A stock-loadable output is checked twice: with the stock class, as stock transformers sees it, and
    with its norms swapped (what ``normsurgeon.load`` does). The source's own round-off is measured once.
    """
    kw = dict(num=settings.num_sequences, seq_len=settings.seq_len, seed=settings.seed, text_file=text_file,
              max_logprob_delta=max_logprob_delta)
    if not stock_loadable:
        return verify_against(src, folder, **kw)
    stock_report = verify_against(src, folder, stock=True, **kw)
    report = verify_against(src, folder, roundoff=False, **kw)
    if "source_roundoff_logprob" in stock_report["metrics"]:  # measured once (not in float64)
        report["metrics"]["source_roundoff_logprob"] = stock_report["metrics"]["source_roundoff_logprob"]
    report["stock_load"] = {"status": stock_report["status"], "loaded_as": stock_report["output"]["loaded_as"],
                            "metrics": stock_report["metrics"]}
    if stock_report["status"] != "pass":
        report["status"] = "fail"
    return report
