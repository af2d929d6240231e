"""Benchmark: converting a GPT-2-small-shaped (124M) model, and forward latency source vs converted.

Run:  python benchmarks/bench_convert.py [--threads 2] [--out benchmarks/results/convert.json]

Measures (CPU):
- conversion wall time and peak resident memory of ``normsurgeon.conversion.convert`` (own subprocess, so the
  peak is the conversion's alone), with and without the built-in verification;
- forward latency of the source and of the converted model (median of repeats, batch 1x128 and 4x256);
- the RMSNorm kernels on a 4096x768 float32 tensor: ``F.layer_norm``, ``F.rms_norm``, and a plain
  composite, which is why ``normsurgeon.modules.RMSNorm`` picks the layer_norm kernel on CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def make_source(folder: Path) -> None:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config()  # 124M: 12 layers, d=768, vocab 50257
    model = T.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    model.save_pretrained(folder)


def _convert_child(src: str, out: str, verify: bool) -> None:
    from normsurgeon.conversion import convert

    t0 = time.perf_counter()
    report = convert(src, out, to="rmsnorm", run_verify=verify, overwrite=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": peak, "status": report["status"],
                      "max_abs_logprob": report.get("metrics", {}).get("max_abs_logprob", {}).get("value")}))


def time_interleaved(fns: dict, repeats: int) -> dict:
    """Time each callable once per round, round-robin, so background load hits all of them alike.

    Returns min and median wall seconds and median process-CPU seconds per callable (min wall and CPU
    time are the least disturbed by other processes on a shared machine).
    """
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: {"min_s": min(v), "median_s": statistics.median(v), "cpu_median_s": statistics.median(cpu[k])}
            for k, v in times.items()}


def norm_kernels(repeats: int = 60) -> dict:
    import torch.nn.functional as F

    out = {}
    for rows in (4096, 512):
        x = torch.randn(rows, 768)
        x = x - x.mean(-1, keepdim=True)
        w = torch.ones(768)
        fns = {
            "F.layer_norm": lambda: F.layer_norm(x, (768,), w, None, 1e-5),
            "F.rms_norm": lambda: F.rms_norm(x, (768,), w, 1e-5),
            "composite": lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w,
        }
        out[f"{rows}x768"] = time_interleaved(fns, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/convert.json"))
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        _convert_child(args.child[0], args.child[1], args.child[2] == "1")
        return
    results: dict = {"machine": _machine(), "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "gpt2-124m", Path(tmp) / "rms"
        make_source(src)
        results["checkpoint_bytes"] = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        for verify in (False, True):
            proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", str(src),
                                   str(out), "1" if verify else "0"], capture_output=True, text=True, check=True)
            results["convert_verify" if verify else "convert_only"] = json.loads(proc.stdout.strip().splitlines()[-1])
        from normsurgeon.io.loader import load_model

        source = load_model(str(src)).model
        converted = load_model(str(out)).model
        stock = load_model(str(out), stock=True).model
        lat = {}
        rms_view = load_model(str(out)).model
        for m in rms_view.modules():
            if hasattr(m, "impl"):
                m.impl = "rms"  # the same converted weights on the F.rms_norm kernel
        with torch.no_grad():
            for shape in ((1, 128), (4, 256)):
                ids = torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(0))
                lat[f"{shape[0]}x{shape[1]}"] = time_interleaved({
                    "source": lambda: source(ids),
                    "converted (normsurgeon.load, auto kernel)": lambda: converted(ids),
                    "converted (stock GPT2LMHeadModel)": lambda: stock(ids),
                    "converted (F.rms_norm kernel)": lambda: rms_view(ids),
                }, args.repeats)
        results["forward_latency"] = lat
    results["norm_kernels"] = norm_kernels()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
