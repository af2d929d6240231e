"""PNG plots of a diagnosis (matplotlib, Agg backend; imported lazily).

``write_plots`` returns the file names it wrote; without matplotlib it writes none and says so.
"""
from __future__ import annotations

from pathlib import Path

from normsurgeon.diagnose.compute import Diagnosis


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(d: Diagnosis, folder: Path, title: str = "") -> tuple[list[str], str | None]:
    """Write activations/gradients/angular/removal (and spikes) PNGs into ``folder``."""
    try:
        plt = _plt()
    except ImportError:
        return [], "matplotlib is not installed: no plots (pip install matplotlib)"
    folder = Path(folder)
    written = []
    layers = [x["layer"] for x in d.layers]
    states = [0] + layers

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    ax[0].plot(states, [d.embedding["second_moment"]] + [x["second_moment"] for x in d.layers], "o-", label="E[h²]")
    ax[0].plot(states, [d.embedding["variance"]] + [x["variance"] for x in d.layers], "s--", label="Var[h]")
    ax[0].set(yscale="log", xlabel="state (0 = embeddings, l = output of block l)", ylabel="moment (log scale)",
              title="hidden-state moments")
    ax[0].legend()
    ax[1].plot(states, [d.embedding["top_abs"][0]] + [x["top_abs"][0] for x in d.layers], "o-", label="top-1 |h|")
    ax[1].plot(states, [d.embedding["median_abs"]] + [x["median_abs"] for x in d.layers], "s--", label="median |h|")
    ax[1].set(yscale="log", xlabel="state (0 = embeddings, l = output of block l)", ylabel="|h| (log scale)",
              title="massive activations")
    ax[1].legend()
    written.append(_save(fig, folder / "activations.png", title, plt))

    if "grad_norm_block" in d.layers[0]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(layers, [x["grad_norm_block"] for x in d.layers], "o-", label="whole block")
        if all(x.get("grad_norm_ffn") is not None for x in d.layers):
            ax.plot(layers, [x["grad_norm_ffn"] for x in d.layers], "s--", label="FFN weights")
        ax.plot(layers, [x["grad_norm_input"] for x in d.layers], "^:", label="dL/d(block input)")
        ax.set(yscale="log", xlabel="block", ylabel="gradient L2 norm (log scale)", title="gradient norms per block")
        ax.legend()
        written.append(_save(fig, folder / "gradients.png", title, plt))

    import numpy as np

    L = d.num_layers
    grid = np.full((L, L + 1), np.nan)  # rows n = 1..L, columns l = 0..L
    for n in range(1, L + 1):
        for l in range(0, L + 1 - n):
            grid[n - 1, l] = d.angular[l][l + n]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0,
                   extent=(-0.5, L + 0.5, 0.5, L + 0.5))
    fig.colorbar(im, ax=ax, label="angular distance / π (last token)")
    ax.set(xlabel="state l (0 = embeddings)", ylabel="n (blocks skipped)",
           title=r"angular distance $d(x_l,\ x_{l+n})$ between block states")
    ax.yaxis.set_major_locator(_integer_ticks())
    written.append(_save(fig, folder / "angular.png", title, plt))

    if "removal_delta_loss" in d.layers[0]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        vals = [x["removal_delta_loss"] for x in d.layers]
        ax.bar(layers, vals, color=["tab:red" if v > 0 else "tab:gray" for v in vals])
        ax.set(xlabel="block removed (replaced by identity)", ylabel="Δ loss (nats/token)",
               title="loss change from removing one block")
        if max(vals) > 50 * max(1e-6, sorted(vals)[len(vals) // 2]):  # one dominant block: show the rest too
            ax.set_yscale("symlog", linthresh=max(1e-4, abs(sorted(vals)[len(vals) // 2]) * 2))
        written.append(_save(fig, folder / "removal.png", title, plt))

    if d.spikes:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        for key, style in (("loss", "-"), ("grad_norm", "-")):
            s = d.spikes.get(key)
            if not s:
                continue
            a = ax if key == "loss" else ax.twinx()
            a.plot(s["values"], style, lw=0.8, color="tab:blue" if key == "loss" else "tab:orange", label=key)
            a.plot(s["spikes"], [s["values"][i] for i in s["spikes"]], "x", color="tab:red")
            a.set_ylabel(key)
        ax.set(xlabel="step", title="training log (x = spike: > mean + 6 std of the last 128)")
        written.append(_save(fig, folder / "spikes.png", title, plt))
    return written, None


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig, path: Path, title: str, plt) -> str:
    """Integer ticks on every x axis (blocks, states, steps), the model as the figure's title, 110 dpi."""
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            ax.xaxis.set_major_locator(_integer_ticks())
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
