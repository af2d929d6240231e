"""The prepbn report: ``equivalence_report.json`` / ``.md`` and the loss / blend-weight curve."""
from __future__ import annotations

import json
from pathlib import Path

from normsurgeon.markdown import md_code, md_table
from normsurgeon.train.checkpoint import checkpoints_line

LABELS = {"before": "before (LayerNorm model)", "repbn_no_finetune": "RepBN, recalibrated, no fine-tune",
          "after_finetune": "after fine-tune (RepBN, unfolded)", "after_fold": "after fold (written model)"}


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def to_markdown(r: dict) -> str:
    metric = r["metric"]
    lines = [f"# prepbn: {r['status'].upper()}", "",
             f"- source: `{r['source']['ref']}` ({r['source']['architecture']}, {r['source']['dtype']})",
             f"- output: `{r['output']['path']}` (format `{r['output']['format']}`, {r['output']['dtype']}; "
             f"{r['output']['loads_with']}): no normalization module remains",
             f"- task: {r['task']}; data: `{r['data'].get('source')}` ({r['data'].get('split', '')})", "",
             f"## {metric.capitalize()}", ""]
    rows = []
    for key, label in LABELS.items():
        res = r["results"].get(key)
        if res is None:
            continue
        ch = r.get("change", {}).get(key)
        extra = f" (loss {_f(res['loss'])})" if metric == "accuracy" else f" {res.get('unit', '')}"
        rows.append([label, f"{_f(res[metric])}{extra}", "—" if ch is None else f"{ch:+.4f}"])
    lines.append(md_table(["model", metric, "change vs before"], rows))
    lines += ["", "## Fold check (folded vs unfolded eval-mode RepBN model)", "",
              md_table(["dtype", "max abs logit Δ", "÷ max abs logit", "threshold", "max abs log-prob Δ",
                        "top-1 agreement", "ok"],
                       [[name, f"{c['max_abs_logit']:.3e}", f"{c['rel_to_scale']:.3e}", f"{c['threshold']:.0e}",
                         f"{c['max_abs_logprob']:.3e}", f"{c['top1_agreement']:.4f}", "yes" if c["ok"] else "NO"]
                        for name, c in r["fold_check"].items()])]
    lines += ["", "`written`: the folder reloaded with `load_prepbn` against the in-memory folded model.", "",
              "## Norms", "",
              md_table(["norm", "role", "readers", "eta", "min abs s", "max abs s"],
                       [[md_code(n["name"]), n["role"], ", ".join(md_code(x) for x in n["readers"]), f"{n['eta']:.4f}",
                         f"{n['scale_abs_min']:.3g}", f"{n['scale_abs_max']:.3g}"] for n in r["norms"]])]
    f = r["fold"]
    if f["created_bias"] or f["untied"]:
        lines += ["", f"Created biases: {', '.join(f['created_bias']) or '—'}; untied from the embedding: "
                      f"{', '.join(f['untied']) or '—'}."]
    m, t = r["method"], r["train"]
    lines += ["", "## Method", ""]
    if m["finetune"]:
        s = m["schedule"]
        lines.append(f"- fine-tune: {t['steps_done']} steps; LayerNorm for {s['warmup']} steps, then the blend "
                     f"weight decays linearly from {s['r0']} to 0 over {s['steps']} steps (pure RepBN from step "
                     f"{s['warmup'] + s['steps']}); back-offs: {t.get('backoffs', 0)}")
        cfg = t.get("config", {})
        lines.append(f"- lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, weight decay {cfg.get('weight_decay')}, "
                     f"seed {cfg.get('seed')}")
    else:
        lines.append("- no fine-tune (--finetune not given): LayerNorm swapped for RepBN, statistics recalibrated")
    lines.append(f"- RepBN eta initialised to {m['eta_init']}; BN statistics recalibrated on "
                 f"{m['recalibration_batches']} training batches (cumulative average, parameters frozen)")
    for note in r.get("notes", []):
        lines.append(f"- note: {note}")
    ck = checkpoints_line(r)
    if ck:
        lines.append(ck)
    if r.get("loss_curve"):
        lines += ["", f"![loss and blend weight]({r['loss_curve']})"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: Path) -> None:
    (Path(folder) / "equivalence_report.json").write_text(json.dumps(report, indent=2, default=str))
    (Path(folder) / "equivalence_report.md").write_text(to_markdown(report))


def curve_png(path: Path, history: list[dict], schedule) -> None:
    """Training loss per step and the blend weight (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, [h["ce"] for h in history], lw=0.8, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    lam = [float(h["stage"].split()[-1]) if h.get("stage") else None for h in history]
    ax2.plot(steps, lam, color="tab:orange", lw=1.2, label="blend weight λ (LayerNorm share)")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("blend weight λ")
    ax.set_title("prepbn: fine-tuning loss and LayerNorm → RepBN blend weight")
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88), fontsize=9, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
