"""The rotation study of docs/rotation.md: does rotating the residual stream (``normsurgeon.rotation``) make
tiny models easier to quantize, and by how much?

Models: (i) the shipped byte-level GPT-2 (``examples/tiny-gpt2``, Pre-LN); (ii) the shipped byte-level Llama
(``examples/tiny-llama``, RMSNorm; ``examples/train_tiny_llama.py``); (iii) each of them with *injected massive
activations*: the same function, exactly, with the stream's dominant directions moved onto a few coordinates
(an orthogonal Q_bad built from the stream's principal directions, applied with the rotation machinery itself;
for GPT-2 a mean-preserving one onto pairs of channels, so the model stays a stock GPT-2). That is the shape of
the massive activations of large LLMs (Sun et al. 2024): a few channels carrying most of the stream's energy.

Variants of each model: ``source`` (as shipped), ``converted`` (gains folded, Pre-LN writers centred; Q = I),
``hadamard`` and ``random`` (converted, then rotated). All variants compute the same function (checked).

Quantization (simulated, ``bench_rotation_quant.py``): round-to-nearest symmetric weights, per output channel
(int8, int4) and per group of 64 / 32 inputs (int4); W8A8 / W4A8 add per-token int8 activations at every
quantized layer's input. The head stays in float (as in QuaRot / SpinQuant), embeddings are not quantized.
Loss: mean next-byte cross-entropy on the 64 held-out windows of ``examples/stdlib_corpus.py``.

    python benchmarks/bench_rotation.py [--windows 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_rotation_quant import act_quant, quantize_weights_, stream_stats  # noqa: E402
from stdlib_corpus import heldout_loss, heldout_windows, load_stdlib_corpus  # noqa: E402

from normsurgeon.rotation import rotate_in_memory  # noqa: E402

CONFIGS = {  # name -> (weight bits, group, activation bits)
    "float": (None, None, None),
    "W8 per-channel": (8, None, None),
    "W4 per-channel": (4, None, None),
    "W4 g64": (4, 64, None),
    "W4 g32": (4, 32, None),
    "W8A8": (8, None, 8),
    "W4A8": (4, None, 8),
}


def residual_norms(rot) -> list[str]:
    return [f.norm for f in rot.plan.folds]


def stream_samples(model: torch.nn.Module, norms: list[str], windows: torch.Tensor) -> torch.Tensor:
    """The residual stream at every norm's input, stacked: [N, d] float64."""
    got = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
             for n in norms]
    try:
        with torch.no_grad():
            model(input_ids=windows)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([g.reshape(-1, g.shape[-1]).double() for g in got])


def inject_massive(model: torch.nn.Module, norms: list[str], channels: list[int], alpha: float) -> torch.nn.Module:
    """The same function with massive activations: every residual norm's gain (and shift) on ``channels`` is
    multiplied by ``alpha`` and its readers' input columns divided by it, so what the readers read has a
    few channels ``alpha`` times larger (as in large LLMs) and the product is unchanged. A copy; a head tied
    to the embedding is untied first."""
    from normsurgeon.graph.normmap import build_norm_map

    m = untie_head(copy.deepcopy(model))
    nm = build_norm_map(m)
    c = torch.tensor(channels)
    with torch.no_grad():
        for n in nm.by_role("pre", "final"):
            if n.name not in norms:
                continue
            norm = m.get_submodule(n.name)
            getattr(norm, n.kind.weight_attr)[c] *= alpha  # (a (1+w) gain would need w -> alpha(1+w) - 1)
            bias = getattr(norm, n.kind.bias_attr, None) if n.kind.has_bias else None
            if bias is not None:
                bias[c] *= alpha
            for r in n.readers:
                w = m.get_submodule(r.name).weight
                if r.layout == "linear":
                    w[:, c] /= alpha
                else:
                    w[c, :] /= alpha
    return m


def untie_head(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model


def variants(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], list[str]]:
    d = model.config.hidden_size
    base = rotate_in_memory(model, q=torch.eye(d, dtype=torch.float64))
    out = {"source": model.float().eval(), "converted": base.model.float()}
    for method in ("hadamard", "random"):
        out[method] = rotate_in_memory(model, method=method, seed=0).model.float()
    return out, residual_norms(base)


def evaluate(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, float]:
    res = {}
    for name, (wb, group, ab) in CONFIGS.items():
        m = copy.deepcopy(model)
        if wb is not None:
            quantize_weights_(m, wb, group)
        with act_quant(m, ab):
            res[name] = heldout_loss(m, windows)
    return res


def summarize_stats(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "norm"]
    return {k: {"mean": sum(r[k] for r in rows) / len(rows), "max": max(r[k] for r in rows)} for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--stat-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="tiny-gpt2,tiny-llama")
    ap.add_argument("--alpha", type=float, default=20.0, help="massive-activation factor of model (iii)")
    ap.add_argument("--seeds", type=int, default=0, help="only the seed sweep: W4 per-channel gap over N seeds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    held = load_stdlib_corpus("heldout")
    windows = heldout_windows(held, args.windows, 256, 1234)  # the shipped models' protocol
    stat_windows = heldout_windows(held, args.stat_windows, 256, 99)
    if args.seeds:
        return seed_sweep(args, windows)
    results: dict = {"configs": {k: list(v) for k, v in CONFIGS.items()}, "models": {}}
    for name in args.models.split(","):
        src = AutoModelForCausalLM.from_pretrained(ROOT / "examples" / name).eval()
        t0 = time.perf_counter()
        vs, norms = variants(src)
        # (iii) the same model with injected massive activations on the two strongest stream channels
        samples = stream_samples(src, norms, stat_windows)
        channels = samples.pow(2).mean(0).argsort(descending=True)[:2].tolist()
        outlier = inject_massive(src, norms, channels, args.alpha).eval()
        info = {"channels": channels, "alpha": args.alpha}
        ovs = {"source": outlier, "converted": rotate_in_memory(
            outlier, q=torch.eye(src.config.hidden_size, dtype=torch.float64)).model.float()}
        for method in ("hadamard", "random"):
            ovs[method] = rotate_in_memory(outlier, method=method, seed=0).model.float()
        for label, group, extra in ((name, vs, {}), (f"{name} + massive activations", ovs, info)):
            entry = {"variants": {}, **extra}
            for vname, model in group.items():
                entry["variants"][vname] = {"loss": evaluate(model, windows),
                                            "stats": summarize_stats(stream_stats(model, stat_windows, norms))}
                print(f"{label:36s} {vname:10s} " + " ".join(f"{k}={v:.4f}" for k, v in
                                                            entry["variants"][vname]["loss"].items()), flush=True)
            results["models"][label] = entry
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def seed_sweep(args, windows: torch.Tensor) -> None:
    """The int4 per-channel RTN gap of each rotation kind over ``args.seeds`` seeds (mean, min, max)."""
    out = {}
    for name in args.models.split(","):
        src = AutoModelForCausalLM.from_pretrained(ROOT / "examples" / name).eval()
        fp = heldout_loss(src, windows)

        def gap(model):
            m = copy.deepcopy(model)
            quantize_weights_(m, 4)
            return heldout_loss(m, windows) - fp

        row = {"source": gap(src)}
        for method in ("hadamard", "random"):
            gaps = [gap(rotate_in_memory(src, method=method, seed=s).model.float()) for s in range(args.seeds)]
            row[method] = {"mean": sum(gaps) / len(gaps), "min": min(gaps), "max": max(gaps), "all": gaps}
        out[name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def markdown(results: dict) -> str:
    lines = []
    for label, entry in results["models"].items():
        lines += [f"\n### {label}", "", "held-out loss (nats/byte); in brackets the gap to the variant's float loss", "",
                  "| variant | " + " | ".join(CONFIGS) + " |", "|---|" + "---|" * len(CONFIGS)]
        for vname, v in entry["variants"].items():
            fp = v["loss"]["float"]
            cells = [f"{fp:.4f}"] + [f"{v['loss'][c]:.4f} (+{v['loss'][c] - fp:.4f})" for c in list(CONFIGS)[1:]]
            lines.append(f"| {vname} | " + " | ".join(cells) + " |")
        for base in ("source", "converted"):
            b = entry["variants"][base]["loss"]
            gap = {c: b[c] - b["float"] for c in CONFIGS}
            for vname in ("hadamard", "random"):
                v = entry["variants"][vname]["loss"]
                cuts = [f"{100 * (1 - (v[c] - v['float']) / gap[c]):.0f} %" if gap[c] > 1e-4 else "-"
                        for c in list(CONFIGS)[1:]]
                lines.append(f"| gap cut, {vname} vs {base} | - | " + " | ".join(cuts) + " |")
        lines += ["", "| variant | stream kurtosis (mean / max) | stream max/median | stream channel ratio | "
                  "reader-input kurtosis | reader-input max/median |", "|---|---|---|---|---|---|"]
        for vname, v in entry["variants"].items():
            s = v["stats"]
            lines.append(f"| {vname} | {s['stream_kurtosis']['mean']:.1f} / {s['stream_kurtosis']['max']:.1f} | "
                         f"{s['stream_max_median']['mean']:.0f} / {s['stream_max_median']['max']:.0f} | "
                         f"{s['stream_channel_ratio']['mean']:.1f} / {s['stream_channel_ratio']['max']:.1f} | "
                         f"{s['reader_kurtosis']['mean']:.1f} / {s['reader_kurtosis']['max']:.1f} | "
                         f"{s['reader_max_median']['mean']:.0f} / {s['reader_max_median']['max']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
