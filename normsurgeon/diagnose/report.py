"""A diagnosis as Markdown (plots referenced next to it) and as a self-contained HTML page (plots embedded
as base64 data URIs, so the one file can be mailed or opened anywhere).

>>> lines = headline({"summary": {"second_moment_last_over_first": 4.0, "max_massive_ratio": 80.0,
...                               "max_massive_layer": 3}, "loss": 1.5, "num_layers": 4, "layers": []})
>>> lines[1]
'E[h²] grows ×4 from block 1 to block 4'
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from normsurgeon.markdown import md_table


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def headline(d: dict) -> list[str]:
    """The at-a-glance findings, one sentence each."""
    s, L = d["summary"], d["num_layers"]
    out = [f"loss {d['loss']:.4f} nats/token on the diagnosis windows",
           f"E[h²] grows ×{s['second_moment_last_over_first']:.3g} from block 1 to block {L}",
           f"largest top-1/median |h| ratio {s['max_massive_ratio']:.3g} at block {s['max_massive_layer']}"
           + (" (massive activations: ratio > 100)" if s["max_massive_ratio"] > 100 else "")]
    if "grad_norm_max_over_min" in s:
        out.append(f"block gradient norms span ×{s['grad_norm_max_over_min']:.3g} (max/min); "
                   f"first/last ×{s['grad_norm_first_over_last']:.3g}")
    if "ffn_grad_norm_max_over_min" in s:
        out.append(f"FFN-weight gradient norms span ×{s['ffn_grad_norm_max_over_min']:.3g}")
    if "angular_deep_over_shallow" in s:
        out.append(f"consecutive-block angular distance, deeper half / shallower half: {s['angular_deep_over_shallow']:.3g}")
    if "least_important_layer" in s:
        k = s["least_important_layer"]
        drop = d["layers"][k - 1]["removal_delta_loss"] if d["layers"] else float("nan")
        out.append(f"removing block {k} changes the loss least ({drop:+.4g}); mean Δloss deeper half "
                   f"{s['removal_mean_deep_half']:+.4g}, shallower half {s['removal_mean_shallow_half']:+.4g}")
    sp = d.get("spikes")
    if sp:
        for key in ("loss", "grad_norm"):
            if key in sp:
                out.append(f"{key} spike score {sp[key]['score']:.4f} ({len(sp[key]['spikes'])} spikes in "
                           f"{sp[key]['steps_scored']} scored steps)")
    return out


COLUMNS = [("layer", "block"), ("second_moment", "E[h²]"), ("variance", "Var[h]"), ("rms", "RMS"),
           ("massive_ratio", "top1/median |h|"), ("grad_norm_block", "‖g‖ block"), ("grad_norm_ffn", "‖g‖ FFN"),
           ("grad_norm_input", "‖dL/dx‖"), ("removal_delta_loss", "Δloss removed")]


def _rows(d: dict) -> tuple[list[str], list[list[str]]]:
    cols = [(k, t) for k, t in COLUMNS if k == "layer" or k in d["layers"][0]]
    emb = d["embedding"]
    rows = [["0 (emb.)"] + [_f(emb.get(k)) for k, _ in cols[1:]]]
    rows += [[_f(x.get(k)) for k, _ in cols] for x in d["layers"]]
    return [t for _, t in cols], rows


def to_markdown(d: dict, plots: list[str], title: str) -> str:
    head, rows = _rows(d)
    lines = [f"# Diagnosis: {title}", "", f"{d['model_class']}, {d['num_layers']} blocks (`{d['block_path']}`), "
             f"{d['num_sequences']} sequences × {d['seq_len']} tokens.", "", "## At a glance", ""]
    lines += [f"- {h}" for h in headline(d)]
    lines += ["", "## Per block", "", md_table(head, rows)]
    lines += ["", _explanation(d), ""]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += ["Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in d["timings"].items()), ""]
    return "\n".join(lines)


def _explanation(d: dict) -> str:
    return ("States are raw block outputs taken with hooks (not `hidden_states`, whose last entry is after "
            "the final norm). Gradients are of the mean loss over all windows; FFN = weights (≥2-D) of the "
            "feed-forward module only. Δloss removed: block replaced by the identity on the first "
            f"{d['settings']['removal_sequences']} windows.")


def data_uri(path: Path) -> str:
    """``path`` (a PNG) as a ``data:`` URI, for an HTML page that needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def to_html(d: dict, plots: list[str], title: str, folder: Path | None = None) -> str:
    """The diagnosis as one HTML page. ``folder``: where the ``plots`` PNGs are; they are embedded (base64),
    so the page is self-contained. Without ``folder`` the page refers to them by name."""
    head, rows = _rows(d)
    e = html.escape
    parts = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>Diagnosis: {e(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1140px;margin:2em auto;padding:0 1em;"
             "line-height:1.45;color:#222}h1{font-size:1.6em}table{border-collapse:collapse;font-size:.95em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
             "figure{margin:1.2em 0}figure img{display:block;max-width:100%;height:auto}"
             "figcaption{color:#555;font-size:.9em}code{background:#f3f3f3;padding:0 .2em}</style></head><body>",
             f"<h1>Diagnosis: {e(title)}</h1>",
             f"<p>{e(d['model_class'])}, {d['num_layers']} blocks (<code>{e(str(d.get('block_path', '')))}</code>), "
             f"{d['num_sequences']} sequences × {d['seq_len']} tokens.</p><h2>At a glance</h2><ul>"]
    parts += [f"<li>{e(h)}</li>" for h in headline(d)]
    parts += ["</ul>"]
    if plots:
        parts += ["<h2>Plots</h2>"]
    for p in plots:
        src = data_uri(Path(folder) / p) if folder is not None and (Path(folder) / p).is_file() else p
        parts += [f"<figure><img src='{e(src)}' alt='{e(p)}'><figcaption>{e(p)}</figcaption></figure>"]
    parts += ["<h2>Per block</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts += ["</table>", f"<p>{e(_explanation(d)).replace('`', '')}</p>"]
    if d.get("timings"):
        parts += ["<p>Timings: " + e(", ".join(f"{k} {v:.1f} s" for k, v in d["timings"].items())) + "</p>"]
    parts += ["</body></html>"]
    return "\n".join(parts)
