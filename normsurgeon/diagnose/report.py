"""A diagnosis as Markdown and as a self-contained HTML page (plots referenced next to it).

>>> lines = headline({"summary": {"second_moment_last_over_first": 4.0, "max_massive_ratio": 80.0,
...                               "max_massive_layer": 3}, "loss": 1.5, "num_layers": 4, "layers": []})
>>> lines[1]
'E[h²] grows ×4 from block 1 to block 4'
"""
from __future__ import annotations

import html
from typing import Any


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
    lines += ["", "## Per block", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "States are raw block outputs taken with hooks (not `hidden_states`, whose last entry is after "
              "the final norm). Gradients are of the mean loss over all windows; FFN = weights (≥2-D) of the "
              "feed-forward module only. Δloss removed: block replaced by the identity on the first "
              f"{d['settings']['removal_sequences']} windows.", ""]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += ["Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in d["timings"].items()), ""]
    return "\n".join(lines)


def to_html(d: dict, plots: list[str], title: str) -> str:
    head, rows = _rows(d)
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'>", f"<title>Diagnosis: {e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "img{max-width:540px;margin:4px}</style>",
             f"<h1>Diagnosis: {e(title)}</h1>",
             f"<p>{e(d['model_class'])}, {d['num_layers']} blocks, {d['num_sequences']} sequences × "
             f"{d['seq_len']} tokens.</p><h2>At a glance</h2><ul>"]
    parts += [f"<li>{e(h)}</li>" for h in headline(d)]
    parts += ["</ul><div>"] + [f"<img src='{e(p)}' alt='{e(p)}'>" for p in plots] + ["</div>"]
    parts += ["<h2>Per block</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts += ["</table>"]
    return "\n".join(parts)
