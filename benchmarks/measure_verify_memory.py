"""Measure the peak resident memory of whole-model verification after a streaming conversion.

For each shape and dtype: write a random checkpoint (``make_synthetic.py``), convert it by streaming
without verification, then run the pipeline's own whole-model verification (``stream/pipeline.py``
``_verify(..., "whole", ...)``: normsurgeon load + stock load + the source) in a fresh process. Its peak
is that process's ``ru_maxrss`` (``os.wait4``); a watchdog kills it above ``--limit`` (then the peak is
reported as "above the limit"). These points calibrate ``stream/verify_memory.py``.

    python benchmarks/measure_verify_memory.py gpt2:float32 gpt2:bfloat16 opt-1.3b@12:bfloat16 opt-1.3b:float32

``opt-1.3b@12``: the OPT-1.3B shape with 12 layers instead of 24 (same width and vocabulary).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_VERIFY = """
import json, resource, sys, time, torch
from pathlib import Path
torch.set_num_threads(2)
from normsurgeon.conversion import load_conversion_recipe
from normsurgeon.stream.malloc_tuning import TUNE_FROM_BYTES, tune_malloc
from normsurgeon.stream.pipeline import _verify
from normsurgeon.stream.plan import plan_streaming
src, out = Path(SRC), Path(OUT)
if sum(f.stat().st_size for f in src.glob("*.safetensors")) >= TUNE_FROM_BYTES:
    tune_malloc()  # as stream_convert does before planning
rec = load_conversion_recipe(None, "rmsnorm")
plan = plan_streaming(src, "rmsnorm", rec.bias_policy, None, read_shifts=True)
numel = sum(t.numel for t in plan.checkpoint.tensors.values())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
r = _verify(src, out, "whole", plan, rec)
print("RESULT " + json.dumps({"status": r["status"], "numel": numel, "baseline_rss_bytes": base,
      "stock_loadable": plan.rms_plan.stock_loadable, "verify_s": round(time.perf_counter() - t0, 1),
      "max_abs_logprob": r["metrics"]["max_abs_logprob"]["value"]}))
"""


def _kib(path: str, key: str) -> int:
    return next(int(l.split()[1]) * 1024 for l in Path(path).read_text().splitlines() if l.startswith(key))


def _watch(pid: int, limit: int, hit: list) -> None:
    """Kill ``pid`` above ``limit`` bytes resident, or when the machine has under 1.5 GiB available."""
    while True:
        try:
            rss = _kib(f"/proc/{pid}/status", "VmRSS:")
        except (OSError, StopIteration):
            return
        if rss > limit or _kib("/proc/meminfo", "MemAvailable:") < 1.5 * 2**30:
            hit.append(rss)
            os.kill(pid, 9)
            return
        time.sleep(0.05)


def run(cmd: list[str], limit: int | None = None) -> tuple[int, int, str, float]:
    """Run ``cmd``; return (exit code, peak RSS bytes, stdout, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    hit: list = []
    if limit:
        threading.Thread(target=_watch, args=(proc.pid, limit, hit), daemon=True).start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return (-9 if hit else code), usage.ru_maxrss * 1024, out, time.perf_counter() - t0


def measure(shape: str, dtype: str, work: Path, limit: int) -> dict:
    src, out = work / f"{shape}-{dtype}", work / f"{shape}-{dtype}-rms"
    py = sys.executable
    name, _, layers = shape.partition("@")  # "opt-1.3b@12": that shape with 12 layers
    make = ("import sys, pathlib, torch; sys.path.insert(0, 'benchmarks'); import make_synthetic as m\n"
            f"cfg = m.SHAPES[{name!r}]; layers = {int(layers or 0)}\n"
            "key = 'n_layer' if 'n_layer' in cfg else 'num_hidden_layers'\n"
            "cfg[key] = layers or cfg[key]\n"
            f"print(m.make({name!r}, pathlib.Path({str(src)!r}), torch.{dtype}, int(2e9)))\n")
    code, _, log, _ = run([py, "-c", make])
    if code:
        raise SystemExit(log[-2000:])
    conv = (f"from normsurgeon.stream import stream_convert\n"
            f"stream_convert({str(src)!r}, {str(out)!r}, verify='none', max_shard_size='2GB', overwrite=True)\n")
    code, _, log, _ = run([py, "-c", conv])
    if code:
        raise SystemExit(log[-2000:])
    child = f"SRC, OUT = {str(src)!r}, {str(out)!r}\n" + _VERIFY
    code, peak, log, secs = run([py, "-c", child], limit)
    res = {"shape": shape, "dtype": dtype, "peak_rss_bytes": peak, "process_s": round(secs, 1)}
    if code == -9:
        res["killed_above_bytes"] = limit
    elif code:
        raise SystemExit(log[-3000:])
    else:
        res.update(json.loads(next(l for l in log.splitlines() if l.startswith("RESULT "))[7:]))
        res["bytes_per_param"] = round(peak / res["numel"], 2)
    shutil.rmtree(src), shutil.rmtree(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("points", nargs="+", help="shape:dtype, e.g. gpt2:float32 (shapes of make_synthetic.py)")
    ap.add_argument("--work", type=Path, default=Path("/work/bench/verify-memory"))
    ap.add_argument("--limit", type=float, default=20.0, help="kill a verification above this many GiB")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    for point in a.points:
        shape, dtype = point.split(":")
        print(json.dumps(measure(shape, dtype, a.work, int(a.limit * 2**30))), flush=True)
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
