"""Plot the streaming benchmarks from ``benchmarks/results/`` into ``docs/img/streaming.png``.

Reads ``stream13b.log`` and ``verify13b.log`` (``bench_streaming.py`` output) and
``vs_transformer_lens.json`` (``bench_vs_transformer_lens.py``).

    python benchmarks/plot_streaming.py
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
GB = 1e9


def last_json(path: Path) -> dict:
    """The last JSON object printed (indented) in a log that may also hold progress lines."""
    text = path.read_text()
    start = text.rfind("\n{\n") + 1 if "\n{\n" in text else text.index("{")
    return json.loads(text[start:])


def main() -> None:
    conv, ver = last_json(RESULTS / "stream13b.log"), last_json(RESULTS / "verify13b.log")
    peer = json.loads((RESULTS / "vs_transformer_lens.json").read_text())
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))

    bars = [("OPT-13B\ncheckpoint", conv["checkpoint_bytes"], "#888"), ("RAM", 24 * 2**30, "#bbb"),
            ("convert\npeak RSS", conv["peak_rss_bytes"], "#2a7"), ("verify\npeak RSS", ver["peak_rss_bytes"], "#2a7"),
            ("target\n4 GiB", 4 * 2**30, "#d55")]
    ax1.bar([b[0] for b in bars], [b[1] / GB for b in bars], color=[b[2] for b in bars])
    for i, b in enumerate(bars):
        ax1.text(i, b[1] / GB, f"{b[1] / GB:.2f}", ha="center", va="bottom", fontsize=9)
    ax1.set_ylabel("GB")
    ax1.set_title(f"OPT-13B bf16, streaming: {conv['throughput_MBps_convert']:.0f} MB/s convert")

    tools = [("normsurgeon", "normsurgeon\n(plan + read + f64 math\n+ write 650 MB)"),
             ("transformer_lens", "TransformerLens\n(load + process,\nin memory)")]
    for ax, key, title in ((ax2, "work_s", "GPT-2 124M: the work (libraries imported)"),
                           (ax3, "process_wall_s", "GPT-2 124M: whole process (as run from a shell)")):
        for i, (tool, label) in enumerate(tools):
            vals = [r[key] for r in peer["runs"][tool]]
            ax.scatter([i] * len(vals), vals, color="#27c" if i == 0 else "#e93", alpha=0.7, zorder=3)
            med = sorted(vals)[len(vals) // 2]
            ax.hlines(med, i - 0.25, i + 0.25, color="k")
            ax.text(i + 0.28, med, f"{med:.2f} s", va="center", fontsize=9)
        ax.set_xticks(range(len(tools)), [t[1] for t in tools], fontsize=8)
        ax.set_xlim(-0.6, 1.9)
        ax.set_ylim(0, None)
        ax.set_ylabel("seconds")
        ax.set_title(f"{title}\n{peer['rounds']} alternating runs each", fontsize=10)
    ckpt = peer["checkpoint_bytes"]
    mem = {t: sorted(r["peak_rss_bytes"] for r in peer["runs"][t])[len(peer["runs"][t]) // 2] for t, _ in tools}
    names = {"normsurgeon": "normsurgeon", "transformer_lens": "TransformerLens"}
    ax3.text(0.02, 0.03, "median peak RSS: " + ", ".join(f"{names[t]} {m / ckpt:.2f}x the checkpoint"
                                                          for t, m in mem.items()),
             transform=ax3.transAxes, fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs/img/streaming.png"
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
