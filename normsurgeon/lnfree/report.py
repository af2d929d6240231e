"""The remove-ln report: JSON, Markdown, and the loss-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path

from normsurgeon.markdown import md_code, md_table
from normsurgeon.train.checkpoint import checkpoints_line


def loss_curve_png(path: Path, history: list[dict], control: list[dict] | None, events: list[dict],
                   losses: dict) -> None:
    """Training cross-entropy per step (removal run and control), removal events as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if history:
        ax.plot([h["step"] for h in history], [h["ce"] for h in history], lw=1.0, label="norm removal")
    if control:
        ax.plot([h["step"] for h in control], [h["ce"] for h in control], lw=1.0, alpha=0.8, label="with-norm control")
    colors = {"mlp": "tab:green", "attn_qk": "tab:orange", "attn_v": "tab:red", "final": "tab:purple"}
    seen = set()
    for e in events:
        label = e["stage"] if e["stage"] not in seen else None
        seen.add(e["stage"])
        ax.axvline(e["step"], color=colors.get(e["stage"], "grey"), lw=0.6, alpha=0.6, label=label)
    for key, style in (("before", ":"), ("after", "-."), ("control", "--")):
        if losses.get(key) is not None:
            ax.axhline(losses[key], color="black", ls=style, lw=0.8, label=f"held-out {key}: {losses[key]:.4f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train cross-entropy (nats/token)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("remove-ln: fine-tuning loss (vertical lines: removal events)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _where(path: str) -> str:
    """A path of the report (relative to the output folder) for a sentence."""
    return "the output folder itself" if path in (".", "") else f"`{path}/`"


def to_markdown(r: dict) -> str:
    L = r["losses"]
    f = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"# remove-ln report: {r['source']['ref']}", "",
             f"Method: {r['method']['to']} ({'fine-tuned' if r['method']['finetune'] else 'calibration only'}), "
             f"recipe `{r['recipe']['name']}`, {r['train'].get('steps_done', 0)} steps.", ""]
    rows = []
    for key, label in (("before", "original model"), ("removed_no_finetune", "norms removed, calibrated, no fine-tuning"),
                       ("after", "norms removed + fine-tuned"), ("control", "with-norm control, fine-tuned on the same data")):
        v = L.get(key)
        delta = "" if v is None or L.get("before") is None or key == "before" else f"{v - L['before']:+.4f}"
        rows.append([label, f(v), delta])
    lines.append(md_table([f"held-out loss ({L.get('unit', 'nats/token')})", "value", "vs before"], rows))
    if L.get("gap_vs_control") is not None:
        lines += ["", f"**Gap to the with-norm control: {L['gap_vs_control']:+.4f} nats/token.**"]
    eq = r["export"]
    lines += ["", "## Export", ""]
    if eq["native"].get("path"):
        lines.append(f"- native form ({_where(eq['native']['path'])}): norms folded into their readers; max |Δ log-prob| "
                     f"vs the fake-norm model in float64: {eq['native']['float64_vs_fake']:.2e}")
    else:
        lines.append(f"- native form: not written ({eq['native'].get('why_not', '?')})")
    if eq["stock"].get("path"):
        key, other = ("written_vs_native", "written native") if "written_vs_native" in eq["stock"] else \
            ("written_vs_fake", "the fake-norm model")
        lines.append(f"- stock form ({_where(eq['stock']['path'])}, loads in stock `{eq['stock']['class']}`): eps "
                     f"{eq['stock']['eps']:g}, largest gain {eq['stock']['max_gain']:.3g}; float64 vs fake "
                     f"{eq['stock']['float64_vs_fake']:.2e}; written stock vs {other} "
                     f"{eq['stock'][key]['max_abs_logprob']:.2e} ({eq['stock'][key]['dtype']})")
        lines.append(f"- **warning**: {eq['stock']['fp16_warning']}")
    else:
        lines.append(f"- stock form: not written ({eq['stock']['why_not']})")
    lines += ["", "## Scales (sigma) per norm", "",
              md_table(["norm", "role", "sigma (frozen)", "calibrated"],
                       [[md_code(name), s["role"], f"{s['sigma']:.5g}", f"{s['calibrated']:.5g}"]
                        for name, s in r["sigmas"].items()])]
    t = r["train"]
    if t.get("tokens_per_second"):
        lines += ["", f"Throughput: {t['tokens_per_second']:.0f} tokens/s, peak memory {t['peak_memory_mb']:.0f} MB, "
                      f"{t['processes']} process(es), back-offs: {t['backoffs']}."]
    for note in r.get("notes", []):
        lines.append(f"- note: {note}")
    ck = checkpoints_line(r)
    if ck:
        lines.append(ck)
    if r.get("loss_curve"):
        lines += ["", f"![training loss per step]({r['loss_curve']})"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: Path) -> None:
    (folder / "lnfree_report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "lnfree_report.md").write_text(to_markdown(report))
