"""`normsurgeon convert` (default path: automatic streaming + verification) on a 3.1 GB checkpoint, beside `cp`.

Writes a random GPT-2-XL-shaped bfloat16 checkpoint (1.56 B parameters, 48 layers, d 1600, 25 heads,
vocab 50257, LayerNorm gains 1 + 0.1·N and shifts 0.02·N, shards of at most 2 GB) with
``make_synthetic.py``, then for each run, with the page cache dropped before each step where the
kernel allows it (``sync; echo 3 > /proc/sys/vm/drop_caches``, root only) so both read cold:

1. ``cp -r SRC COPY`` (timed alone, then with the ``sync`` that puts it on disk);
2. ``normsurgeon convert SRC --to rmsnorm -o OUT`` under ``/usr/bin/time -v`` (peak RSS of that
   process; ``ru_maxrss`` of the child where there is no ``/usr/bin/time``), and the verification
   result and timings from ``OUT/equivalence_report.json``.

Issue 11's targets: peak RSS <= 2.5 GiB, speed >= 0.5x that of ``cp`` (our time <= 2x cp's).
Everything under ``--work`` is deleted at the end unless ``--keep``.

    python benchmarks/bench_convert_verify_xl.py --work /work/bench/xl --runs 1
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


def drop_caches() -> bool:
    """Write dirty pages and drop the page cache; False where that is not allowed (the reads may be warm)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, str, int]:
    """Run ``cmd``; return (seconds, exit code, output, child's ru_maxrss in bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, os.waitstatus_to_exitcode(status), out, usage.ru_maxrss * 1024


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def one_run(src: Path, work: Path) -> dict:
    copy, out = work / "cp-copy", work / "out"
    shutil.rmtree(copy, ignore_errors=True), shutil.rmtree(out, ignore_errors=True)
    res: dict = {}

    cold = drop_caches()
    t_cp, code, log, _ = timed(["cp", "-r", str(src), str(copy)])
    if code:
        raise SystemExit(f"cp failed: {log}")
    t0 = time.perf_counter()
    os.sync()
    res["cp"] = {"cold_cache": cold, "cp_s": round(t_cp, 2), "cp_and_sync_s": round(t_cp + time.perf_counter() - t0, 2),
                 "bytes": folder_bytes(copy)}
    shutil.rmtree(copy)

    cold = drop_caches()
    cli = [str(Path(sys.executable).with_name("normsurgeon")), "convert", str(src), "--to", "rmsnorm", "-o", str(out)]
    gnu_time = Path("/usr/bin/time")
    cmd = [str(gnu_time), "-v", *cli] if gnu_time.exists() else cli
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()
    t_conv, code, log, child_rss = timed(cmd, env)
    peak = child_rss
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    if m:
        peak = int(m.group(1)) * 1024
    report_path = out / "equivalence_report.json"
    if code or not report_path.exists():
        raise SystemExit(f"convert exited {code}:\n{log[-4000:]}")
    cpu = {k: float(v) for k, v in re.findall(r"(User|System) time \(seconds\): ([\d.]+)", log)}
    rep = json.loads(report_path.read_text())
    timing, s = rep.get("timing_s", {}), rep.get("streaming", {})
    res["convert"] = {
        "cold_cache": cold, "exit_code": code, "process_s": round(t_conv, 2), "cpu_s": cpu, "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / GiB, 3), "status": rep["status"], "verify_mode": s.get("verify_mode"),
        "verify_reason": s.get("verify_reason"), "streamed": bool(s),
        "max_abs_logprob": rep["metrics"]["max_abs_logprob"]["value"],
        "mean_kl": rep["metrics"].get("mean_kl", {}).get("value"),
        "top1_agreement": rep["metrics"].get("top1_agreement", {}).get("value"),
        "worst_block": (rep.get("worst_residual_point") or {}).get("point"),
        "timing_s": timing, "bytes_written": s.get("bytes_written"), "in_process_peak_rss_bytes": s.get("peak_rss_bytes"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "status_lines": [l for l in log.splitlines() if l.startswith("·")][-8:],
    }
    conv_only = timing.get("plan", 0) + timing.get("convert", 0)
    res["ratios"] = {  # speed relative to cp = cp time / our time (target >= 0.5)
        "process_vs_cp": round(t_cp / t_conv, 3),
        "process_vs_cp_and_sync": round(res["cp"]["cp_and_sync_s"] / t_conv, 3),
        "conversion_only_vs_cp": round(t_cp / conv_only, 3) if conv_only else None,
        "conversion_only_vs_cp_and_sync": round(res["cp"]["cp_and_sync_s"] / conv_only, 3) if conv_only else None,
    }
    res["targets"] = {"peak_rss_le_2.5GiB": peak <= 2.5 * GiB, "speed_ge_0.5x_cp": t_cp / t_conv >= 0.5,
                      "verified_pass": rep["status"] == "pass"}
    shutil.rmtree(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/work/bench/xl"))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint under --work")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "convert_verify_xl.json")
    a = ap.parse_args()
    src = a.work / "gpt2-xl-bf16"
    a.work.mkdir(parents=True, exist_ok=True)
    info: dict = {"machine": {"cpus": os.cpu_count(), "load_average_start": [round(x, 2) for x in os.getloadavg()]}}
    try:
        if not (src / "config.json").exists():
            t, code, log, _ = timed([sys.executable, "benchmarks/make_synthetic.py", "gpt2-xl", str(src),
                                     "--dtype", "bfloat16", "--shard-size", "2e9"])
            if code:
                raise SystemExit(log[-3000:])
            info["checkpoint"] = json.loads(log.strip().splitlines()[-1]) | {"make_s": round(t, 1)}
        info["checkpoint_bytes"] = folder_bytes(src)
        info["runs"] = []
        for i in range(a.runs):
            r = one_run(src, a.work)
            info["runs"].append(r)
            print(json.dumps(r), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(info, indent=2))
    print(json.dumps({k: v for k, v in info.items() if k != "runs"}))


if __name__ == "__main__":
    main()
