"""Classifying one run of the support matrix from its exit code, its one stderr error line and its report
(the classes of ``support_matrix.py``'s docstring), and the words of a refusal that fit in a cell.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

EXIT_CLASS = {0: "ok", 1: "internal", 2: "usage", 3: "verify", 4: "refused", 5: "input", 6: "resource",
              7: "diverged"}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_lines(stderr: str) -> list[str]:
    """The CLI's error lines: `error: ...` (and `internal error: ...`, the exit-1 form)."""
    return [ln.strip() for ln in ANSI.sub("", stderr).splitlines()
            if ln.strip().startswith(("error:", "internal error:"))]


def last_json(stdout: str):
    """The --json document on stdout (the whole of it, else its last top-level object), or None."""
    s = stdout.strip()
    if not s:
        return None
    try:
        return json.loads(s)
    except ValueError:
        i = s.rfind("\n{")
        try:
            return json.loads(s[i + 1:] if i >= 0 else s)
        except ValueError:
            return None


def short_reason(line: str, width: int = 44) -> str:
    """A few words of a refusal for a table cell: the clause after 'exactly: ' (or 'error: ')."""
    s = re.sub(r"^(internal )?error:\s*", "", line)
    s = re.sub(r"^(cannot convert \S+ to [\w-]+ exactly|cannot remove the norms|`place`)\s*:\s*", "", s)
    clauses = [c.strip().rstrip(",.") for c in re.split(r"[:;(]| - ", s) if c.strip()]
    s = clauses[0] if clauses else s
    return s if len(s) <= width else s[:width - 1].rstrip() + "…"


def _g(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(x) -> str:
    return f"{x:+.1e}" if isinstance(x, (int, float)) else "?"


def classify(recipe: str, rc: int | None, stdout: str, stderr: str, out: Path | None, prep: dict) -> dict:
    """One cell: class, table text, the one-line error (if any) and the report's numbers."""
    lines = error_lines(stderr)
    doc = last_json(stdout)
    res: dict = {"rc": rc, "error": lines[0] if lines else None, "error_lines": len(lines),
                 "error_chars": len(lines[0]) if lines else 0}
    if rc is None:
        res.update(cls="timeout", cell="⏱ timeout")
        return res
    if rc != 0:
        cls = EXIT_CLASS.get(rc, "other")
        if res["error"] is None:  # no error line: keep the last stderr line as a clue
            tail = [ln for ln in ANSI.sub("", stderr).splitlines() if ln.strip()]
            res["error"] = ("(no error line) " + tail[-1].strip()[:300]) if tail else "(no output)"
        cell = {"refused": f"✗ refused: {short_reason(res['error'])}", "internal": "ERR 1",
                "verify": "✗ verify 3", "usage": "✗ usage 2", "input": "✗ input 5", "resource": "✗ resource 6",
                "diverged": "✗ diverged 7"}.get(cls, f"✗ exit {rc}")
        if cls == "verify":
            v = _g(doc, "details", "metrics", "max_abs_logprob", "value")
            res["max_abs_logprob"] = v
        res.update(cls=cls, cell=cell)
        return res
    if recipe in ("convert", "convert-f64"):
        report = doc if isinstance(doc, dict) and "plan" in doc else None
        if report is None and out is not None and (out / "equivalence_report.json").is_file():
            report = json.loads((out / "equivalence_report.json").read_text())
        report = report or {}
        kept = _g(report, "plan", "kept_on_norm") or {}
        res.update(status=report.get("status"), max_abs_logprob=_g(report, "metrics", "max_abs_logprob", "value"),
                   threshold=_g(report, "metrics", "max_abs_logprob", "threshold"), kept_on_norm=kept,
                   stock_loadable=report.get("stock_loadable"))
        converted = set(kept)
        cfg_path = out / "config.json" if out is not None else None
        if cfg_path is not None and cfg_path.is_file():
            ns = json.loads(cfg_path.read_text()).get("normsurgeon") or {}
            for key in ("rmsnorm", "identity", "crms"):
                converted |= set(ns.get(key) or ())
        converted |= set(_g(report, "plan", "baked") or ())
        lns = prep.get("layer_norms", [])
        left = [n for n in lns if n not in converted]
        res.update(layer_norms=len(lns), left_as_is=left)
        if report.get("status") not in (None, "pass"):
            res.update(cls="verify", cell="✗ verify (exit 0)")
        elif left:
            res.update(cls="partial", cell=f"◐ {len(lns) - len(left)}/{len(lns)} LN" +
                                          (f", kept: {len(kept)}" if kept else ""))
        elif kept:
            res.update(cls="kept", cell=f"~ kept: {len(kept)}")
        else:
            res.update(cls="exact", cell="✓ exact")
        return res
    res["cls"] = "ok"
    if recipe == "inspect":
        res["placement"] = _g(doc, "placement")
        res["cell"] = f"✓ {res['placement']}" if res["placement"] else "✓"
    elif recipe == "place":
        res["level"] = _g(doc, "preservation", "level")
        res["delta_loss"] = _g(doc, "evaluation", "delta_loss")
        res["cell"] = f"✓ {res['level']}" if res["level"] else "✓"
    elif recipe == "remove-ln":
        before, removed = _g(doc, "losses", "before"), _g(doc, "losses", "removed_no_finetune")
        res["delta_loss"] = removed - before if isinstance(before, float) and isinstance(removed, float) else None
        res["cell"] = f"✓ Δloss {_num(res['delta_loss'])}"
    elif recipe == "prepbn":
        res["fold_ok"] = all(_g(doc, "fold_check", k, "ok") is not False for k in ("float64", "float32"))
        res["status"] = _g(doc, "status")
        res["cell"] = "✓ folded" if res["fold_ok"] else "✓ (fold check failed)"
    elif recipe == "diagnose":
        res["cell"] = "✓"
    elif recipe == "fold-bn":
        counts = _g(doc, "batchnorm", "counts") or {}
        done, left = counts.get("folded", 0) + counts.get("merged", 0), counts.get("left", 0)
        res.update(bn_counts=counts, status=_g(doc, "status"),
                   bn_left={u.get("name"): u.get("reason") for u in _g(doc, "batchnorm", "units") or []
                            if isinstance(u, dict) and u.get("action") == "left"})
        res["cell"] = f"✓ {done} folded" + (f", {left} left" if left else "") if counts else "✓"
    else:
        res["cell"] = "✓"
    return res


def wraps_exception(line: str | None) -> bool:
    """An error line that quotes a Python exception (``ValueError: ...``): a crash reported as a refusal?"""
    return bool(line) and bool(re.search(r"\b[A-Z]\w*(Error|Exception)\b:", line))
