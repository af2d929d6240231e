"""CPU latency of BN-folded vs original models (random weights from HF configs), BN's share of the
original's runtime (the most folding can gain), and PyTorch's own fusers in the same run.

    python benchmarks/bench_fold_bn.py [--models resnet50 mobilenet_v2] [--batch 4] [--reps 9] [--threads 1]

Timing: variants interleaved round-robin, median of ``reps`` after 2 warm-ups; process CPU time is
reported beside wall time because the machine may be shared.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "batchnorm"))
from helpers import randomise  # noqa: E402

from normsurgeon.batchnorm.fold import fold_batchnorms  # noqa: E402

MODELS = {
    "resnet50": lambda: T.ResNetForImageClassification(T.ResNetConfig()),  # defaults = ResNet-50
    "mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config()),  # 1.0, 224
}


def bn_share(model, x) -> float:
    """Self-CPU share of batch-norm kernels in one profiled forward."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(pixel_values=x)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    bn = sum(e.self_cpu_time_total for e in ev if "batch_norm" in e.key)
    return bn / total


def fx_fuse(model):
    from torch.fx.experimental.optimization import fuse
    return fuse(copy.deepcopy(model))


def ao_fuse(model, pairs):
    from torch.ao.quantization import fuse_modules
    return fuse_modules(copy.deepcopy(model), [list(p) for p in pairs], inplace=False)


def timed(fns: dict, x, reps: int) -> dict:
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(2):
            for f in fns.values():
                f(pixel_values=x)
        for _ in range(reps):
            for k, f in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                f(pixel_values=x)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]) * 1e3, statistics.median(cpu[k]) * 1e3) for k in fns}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, transformers {T.__version__}, threads {a.threads}, batch {a.batch}x3x{a.size}²")
    print("| model | variant | BNs left | wall ms | CPU ms | speedup (wall) | max\|Δ\| / max\|logit\| |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models:
        torch.manual_seed(0)
        model = randomise(MODELS[name]())
        x = torch.randn(a.batch, 3, a.size, a.size)
        t0 = time.perf_counter()
        r = fold_batchnorms(model, (), {"pixel_values": x[:1]})
        fold_s = time.perf_counter() - t0
        pairs = [(e["into"], e["name"]) for e in r.entries if e["action"] == "folded" and "preceding" in e["direction"]]
        variants = {"original": model, "normsurgeon fold-bn (deploy)": r.deploy}
        notes = {}
        for label, make in (("torch.fx fuse", lambda: fx_fuse(model)), ("torch.ao fuse_modules", lambda: ao_fuse(model, pairs))):
            try:
                variants[label] = make().eval()
            except Exception as e:  # noqa: BLE001 - report the peer's failure
                notes[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
        share = bn_share(model, x)
        res = timed(variants, x, a.reps)
        with torch.no_grad():
            ref = model(pixel_values=x).logits
            diffs = {k: (m(pixel_values=x).logits - ref).abs().max().item() / ref.abs().max().item() for k, m in variants.items()}
        base = res["original"][0]
        for k, (w, c) in res.items():
            left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in variants[k].modules())
            print(f"| {name} | {k} | {left} | {w:.1f} | {c:.1f} | {base / w:.3f} | {diffs[k]:.1e} |")
        for k, msg in notes.items():
            print(f"| {name} | {k} | — | fails: {msg} | | | |")
        print(f"| {name} | BN self-CPU share of original (bound: {1 / (1 - share):.3f}x) | {share:.1%} | | | | |")
        print(f"| {name} | fold-bn time {fold_s:.1f} s, counts {r.counts} | | | | | |")


if __name__ == "__main__":
    main()
