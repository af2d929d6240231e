"""Benchmark the streaming conversion: wall time, peak resident memory, throughput, and error.

Each measurement runs in its own subprocess; its peak RSS comes from ``os.wait4`` (ru_maxrss).

    python benchmarks/make_synthetic.py gpt2 /work/bench/gpt2
    python benchmarks/bench_streaming.py convert /work/bench/gpt2 /work/bench/out --verify whole
    python benchmarks/bench_streaming.py verify-layerwise /work/bench/gpt2 /work/bench/out
    python benchmarks/bench_streaming.py in-memory /work/bench/gpt2 /work/bench/out-mem
    python benchmarks/bench_streaming.py error /work/bench/gpt2 /work/bench/out      # same tokens as the peer
    python benchmarks/bench_streaming.py error /work/bench/gpt2 /work/bench/out --dtype float64
        # float32-stored weights evaluated in float64 against the float64 source: the conversion's own error
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = {
    "convert": """
from normsurgeon.stream import stream_convert
r = stream_convert(SRC, OUT, verify=VERIFY, max_shard_size="2GB", dtype=DTYPE)
res = {"timing_s": r["timing_s"], "streaming": r["streaming"], "status": r["status"],
       "metrics": {k: v["value"] for k, v in r.get("metrics", {}).items()}}
""",
    "verify-layerwise": """
from normsurgeon.verification.layerwise import verify_layerwise
r = verify_layerwise(SRC, OUT, num=NUM, seq_len=SEQ)
res = {"status": r["status"], "timing_s": r["timing_s"], "bytes_read": r["layerwise"]["bytes_read"],
       "metrics": {k: v["value"] for k, v in r["metrics"].items()},
       "worst_block": r["worst_residual_point"]}
""",
    "in-memory": """
from normsurgeon.conversion import convert
r = convert(SRC, OUT, run_verify=False, max_shard_size="2GB", dtype=DTYPE)
res = {"timing_s": r["timing_s"]}
""",
    "error": """
import torch
from normsurgeon.io.loader import load_model
from normsurgeon.verification.inputs import random_token_batches
from normsurgeon.verification.metrics import output_metrics
src, conv = load_model(SRC), load_model(OUT)
dt = getattr(torch, DTYPE) if DTYPE else conv.dtype  # --dtype float64: evaluate the stored weights exactly
src.model.to(dt); conv.model.to(dt)
ids = random_token_batches(src.model.config.vocab_size, 4, 64, 0)[0]["input_ids"]
with torch.no_grad():
    m = output_metrics(src.model(ids).logits, conv.model(ids).logits)
res = {"dtype": str(dt), "max_abs_logprob": m["max_abs_logprob"], "mean_kl": m["mean_kl"],
       "top1_agreement": m["top1_agreement_all"]}
""",
}


def run_child(kind: str, src: str, out: str, threads: int, verify: str = "none", dtype: str | None = None,
              num: int = 4, seq: int = 64) -> dict:
    code = (f"import json, sys, time, torch\ntorch.set_num_threads({threads})\nsys.path.insert(0, {str(ROOT)!r})\n"
            f"SRC, OUT, VERIFY, DTYPE, NUM, SEQ = {src!r}, {out!r}, {verify!r}, {dtype!r}, {num}, {seq}\n"
            "t0 = time.perf_counter()\n" + _CHILD[kind] +
            "res['wall_s'] = round(time.perf_counter() - t0, 2)\nprint('RESULT ' + json.dumps(res, default=str))\n")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{kind} failed:\n{stderr[-3000:]}")
    line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res.update({"kind": kind, "process_wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024})
    return res


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=sorted(_CHILD))
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--verify", default="none")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the output folder")
    a = ap.parse_args()
    if a.kind in ("convert", "in-memory") and Path(a.out).exists():
        shutil.rmtree(a.out)
    res = run_child(a.kind, a.src, a.out, a.threads, a.verify, a.dtype, a.num, a.seq_len)
    size = checkpoint_bytes(Path(a.src))
    res["checkpoint_bytes"] = size
    if a.kind in ("convert", "in-memory"):
        conv_s = res["timing_s"].get("convert", res["timing_s"].get("total")) + res["timing_s"].get("plan", 0)
        res["throughput_MBps_convert"] = round(size / 1e6 / conv_s, 1)
        res["throughput_MBps_process"] = round(size / 1e6 / res["process_wall_s"], 1)
    res["peak_over_checkpoint"] = round(res["peak_rss_bytes"] / size, 3)
    print(json.dumps(res, indent=1, default=str))
    if a.kind in ("convert", "in-memory") and not a.keep:
        pass


if __name__ == "__main__":
    main()
