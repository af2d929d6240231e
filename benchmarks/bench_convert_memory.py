"""Benchmark: peak memory and wall time of `convert` on a GPT-2-small-shaped checkpoint (issue 14's target:
peak RSS <= 2x the checkpoint with verification, wall time no worse than 27 s).

Run:  python benchmarks/bench_convert_memory.py [--threads 2] [--out benchmarks/results/convert_memory.json]

Each conversion runs in its own process (its peak resident set is the conversion's alone): in memory
without and with verification, and ``--stream`` with whole-model and layer-by-layer verification. The
source is ``bench_convert.make_source`` (124.4M parameters, randomised LayerNorms, float32, 498 MB).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RUNS = {
    "in memory, no verification": {"stream": False, "verify": False},
    "in memory + verification": {"stream": False, "verify": True},
    "--stream + whole-model verification": {"stream": True, "verify": "whole"},
    "--stream + layer-by-layer verification": {"stream": True, "verify": "layerwise"},
}


def _child(src: str, out: str, spec: dict) -> None:
    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    t0 = time.perf_counter()
    if spec["stream"]:
        from normsurgeon.stream import stream_convert

        report = stream_convert(src, out, verify=spec["verify"], overwrite=True)
    else:
        from normsurgeon.conversion import convert

        report = convert(src, out, run_verify=spec["verify"], overwrite=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value = report.get("metrics", {}).get("max_abs_logprob", {}).get("value")
    print(json.dumps({"wall_s": round(wall, 2), "peak_rss_bytes": peak, "status": report["status"],
                      "max_abs_logprob": value}))


def _baseline() -> int:
    """Peak RSS of a process that imports what a conversion imports and does nothing else."""
    code = ("import resource, torch, transformers, normsurgeon.conversion, normsurgeon.stream;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/convert_memory.json"))
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], json.loads(args.child[2]))
        return
    from bench_convert import _machine, make_source

    results: dict = {"machine": _machine(), "threads": args.threads, "baseline_rss_bytes": _baseline(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "gpt2-124m"
        make_source(src)
        ckpt = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        results["checkpoint_bytes"] = ckpt
        for name, spec in RUNS.items():
            proc = subprocess.run([sys.executable, __file__, "--child", str(src), str(Path(tmp) / "out"),
                                   json.dumps({**spec, "threads": args.threads})], capture_output=True, text=True)
            if proc.returncode:
                results["runs"][name] = {"error": proc.stderr.strip().splitlines()[-1:]}
            else:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["peak_over_checkpoint"] = round(r["peak_rss_bytes"] / ckpt, 2)
                results["runs"][name] = r
            print(name, results["runs"][name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
