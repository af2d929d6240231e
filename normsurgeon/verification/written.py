"""Verify a checkpoint a conversion has just written, against the source already in memory.

>>> import tempfile, pathlib
>>> from normsurgeon.conversion import convert
>>> from normsurgeon.io.loader import load_model
>>> from normsurgeon.recipes import recipe_for_target
>>> out = pathlib.Path(tempfile.mkdtemp()) / "rms"
>>> _ = convert("normsurgeon.testing:tiny_gpt2", out, run_verify=False)
>>> r = verify_written(load_model("normsurgeon.testing:tiny_gpt2"), out, True, recipe_for_target("rmsnorm").verify)
>>> r["status"], r["stock_load"]["status"]
('pass', 'pass')
"""
from __future__ import annotations

from pathlib import Path

from normsurgeon.io.formats import swap_to_rmsnorm
from normsurgeon.io.loader import LoadedModel, load_model
from normsurgeon.verification.api import verify_loaded


def verify_written(src: LoadedModel, folder: Path, stock_loadable: bool, settings, text_file: Path | None = None,
                   max_logprob_delta: float | None = None) -> dict:
    """Verify the checkpoint written to ``folder`` against the loaded source (reused, not reloaded).

    A stock-loadable output is loaded once, with the stock class: it is checked as stock transformers
    sees it, then its norms are swapped in place (what ``normsurgeon.load`` does) and it is checked as
    normsurgeon sees it; both forms share the weights. The source's own round-off is measured once.
    """
    kw = dict(num=settings.num_sequences, seq_len=settings.seq_len, seed=settings.seed, text_file=text_file,
              max_logprob_delta=max_logprob_delta)
    if not stock_loadable:
        return verify_loaded(src, load_model(str(folder)), **kw)
    stock = load_model(str(folder), stock=True)
    stock_report = verify_loaded(src, stock, **kw)
    swap_to_rmsnorm(stock.model, stock.converted or {})
    report = verify_loaded(src, stock, roundoff=False, **kw)
    if "source_roundoff_logprob" in stock_report["metrics"]:  # measured once (not in float64)
        report["metrics"]["source_roundoff_logprob"] = stock_report["metrics"]["source_roundoff_logprob"]
    report["stock_load"] = {"status": stock_report["status"], "loaded_as": stock_report["output"]["loaded_as"],
                            "metrics": stock_report["metrics"]}
    if stock_report["status"] != "pass":
        report["status"] = "fail"
    return report
