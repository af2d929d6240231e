"""The equivalence report: one JSON document (``normsurgeon.equivalence/1``) and its Markdown and
terminal renderings.

>>> r = {"status": "pass", "metrics": {"max_abs_logprob": {"value": 1e-7, "threshold": 1e-4, "ok": True}},
...      "per_layer": [], "source": {"ref": "a"}, "output": {"path": "b", "dtype": "float32"}}
>>> "log-prob" in to_markdown(r)
True
"""
from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "normsurgeon.equivalence/1"

_LABELS = {
    "max_abs_logprob": "max |Δ log-prob|",
    "mean_kl": "mean KL(source‖converted)",
    "top1_agreement": "top-1 agreement (decided positions)",
    "top1_agreement_all": "top-1 agreement (all positions)",
    "max_abs_logit": "max |Δ logit| (information)",
    "source_roundoff_logprob": "source's own round-off: max |Δ log-prob| vs float64",
}


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.6g}"
    return str(v)


def status_of(metrics: dict) -> str:
    oks = [m["ok"] for m in metrics.values() if m.get("ok") is not None]
    return "pass" if all(oks) else "fail"


def to_markdown(report: dict) -> str:
    lines = [f"# Equivalence report: {report.get('status', '?').upper()}", ""]
    src, out = report.get("source", {}), report.get("output", {})
    lines.append(f"- source: `{src.get('ref')}` ({src.get('architecture', '')}, {src.get('dtype', '')})")
    lines.append(f"- converted: `{out.get('path')}` ({out.get('dtype', '')})")
    if report.get("recipe"):
        lines.append(f"- recipe: `{report['recipe'].get('name')}`")
    if report.get("inputs"):
        i = report["inputs"]
        lines.append(f"- inputs: {i.get('description')}, computed in {i.get('compute_dtype')}")
    lines += ["", "| metric | value | threshold | ok |", "|---|---|---|---|"]
    for name, m in report.get("metrics", {}).items():
        ok = {True: "✓", False: "✗", None: "info"}[m.get("ok")]
        label = _LABELS.get(name, name).replace("|", "\\|")
        lines.append(f"| {label} | {_fmt(m['value'])} | {_fmt(m.get('threshold'))} | {ok} |")
    if report.get("per_layer"):
        lines += ["", "Residual stream at each norm input (source centred first):", "",
                  "| point | relative L2 error | cosine |", "|---|---|---|"]
        for p in report["per_layer"]:
            lines.append(f"| `{p['point']}` | {_fmt(p['resid_rel_l2'])} | {p['resid_cosine']:.12f} |")
    if report.get("stock_load"):
        st = report["stock_load"]
        lines.append(f"\nLoaded with stock `{st['loaded_as']}` (no normsurgeon): {st['status'].upper()}, "
                     f"max abs Δ log-prob {_fmt(st['metrics']['max_abs_logprob']['value'])}")
    if report.get("inventory"):
        inv = report["inventory"]
        lines += ["", "Tensors: " + ", ".join(f"{k} {v if isinstance(v, int) else len(v)}" for k, v in inv.items())]
    for w in report.get("warnings", []):
        lines.append(f"- warning: {w}")
    return "\n".join(lines) + "\n"


def failure_line(report: dict) -> str:
    """One line for a failed verification: the failing metric, its threshold, where the error appears.

    >>> failure_line({"metrics": {"max_abs_logprob": {"value": 0.2, "threshold": 0.15, "ok": False}},
    ...               "per_layer": [{"point": "h.0", "resid_rel_l2": 1e-9}, {"point": "h.1", "resid_rel_l2": 0.3}]})
    'max |Δ log-prob| 0.2 > threshold 0.15; the error first appears at h.1 (residual rel. L2 0.3)'
    """
    parts = []
    for name, m in report.get("metrics", {}).items():
        if m.get("ok") is False:
            op = "<" if name.startswith("top1") else ">"
            parts.append(f"{_LABELS.get(name, name)} {_fmt(m['value'])} {op} threshold {_fmt(m['threshold'])}")
    stock = report.get("stock_load")
    if stock and stock.get("status") == "fail":
        v = stock["metrics"]["max_abs_logprob"]["value"]
        parts.append(f"loaded with stock {stock.get('loaded_as')}: max |Δ log-prob| {_fmt(v)}")
    line = "; ".join(parts[:2]) or "outputs differ beyond the tolerance"
    points = report.get("per_layer") or []
    worst = max((p["resid_rel_l2"] for p in points), default=0.0)
    first = next((p for p in points if worst > 0 and p["resid_rel_l2"] >= 0.1 * worst), None)
    if first is not None:
        line += f"; the error first appears at {first['point']} (residual rel. L2 {_fmt(first['resid_rel_l2'])})"
    return line


def write_report(report: dict, folder: Path) -> None:
    (folder / "equivalence_report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "equivalence_report.md").write_text(to_markdown(report))


def print_report(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"equivalence: {report.get('status', '?').upper()}")
    for col in ("metric", "value", "threshold", ""):
        table.add_column(col)
    for name, m in report.get("metrics", {}).items():
        ok = {True: "[green]✓[/]", False: "[red]✗[/]", None: "info"}[m.get("ok")]
        table.add_row(_LABELS.get(name, name), _fmt(m["value"]), _fmt(m.get("threshold")), ok)
    stock = report.get("stock_load")
    if stock:
        ok = "[green]✓[/]" if stock["status"] == "pass" else "[red]✗[/]"
        value = stock["metrics"]["max_abs_logprob"]["value"]
        table.add_row(f"stock {stock['loaded_as']} load, max |Δ log-prob|", _fmt(value), "same", ok)
    worst = max(report.get("per_layer", []), key=lambda p: p["resid_rel_l2"], default=None)
    if worst:
        table.add_row("worst residual point", f"{worst['point']} {_fmt(worst['resid_rel_l2'])}", "—", "info")
    console.print(table)
