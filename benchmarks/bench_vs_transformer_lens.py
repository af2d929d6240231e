"""normsurgeon's streaming conversion vs TransformerLens's weight processing, on the same GPT-2 checkpoint.

Both run in fresh subprocesses, alternately, ``--rounds`` times, after ``sync`` so that neither inherits
the other's disk writeback; the input is in the page cache for both (read once before round 1).
Three times per run, so the comparison is like for like whichever one matters to the reader:

- ``import_s``: interpreter start to the tool imported (TransformerLens's import pulls in transformers'
  model code; normsurgeon imports it lazily, so for us that import is reported as ``model_code_s``);
- ``work_s``: with the libraries and the GPT-2 model code imported, the tool's work on the weights.
  TransformerLens: ``from_pretrained`` + ``boot_transformers`` + ``enable_compatibility_mode()``, in
  memory, nothing written. normsurgeon: ``stream_convert`` (plan, read, float64 fold + centre, write
  650 MB of safetensors), no verification;
- ``process_wall_s``: the whole process, start to exit, as a user at a shell sees it.

Peak resident memory is each process's ``ru_maxrss`` (``os.wait4``).

    python benchmarks/make_synthetic.py gpt2 /work/bench/gpt2
    python benchmarks/bench_vs_transformer_lens.py /work/bench/gpt2 /work/bench/out --tl-python /tmp/tlvenv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_OURS = """
import time
T_START = time.perf_counter()
import json, sys, torch
torch.set_num_threads({threads})
sys.path.insert(0, {root!r})
from normsurgeon.stream import stream_convert
t_imp = time.perf_counter()
import transformers
transformers.GPT2LMHeadModel  # the model code; TransformerLens's own import has loaded it before its timer
t_code = time.perf_counter()
r = stream_convert({src!r}, {out!r}, verify="none", max_shard_size="2GB")
t_end = time.perf_counter()
print("RESULT " + json.dumps({{"import_s": t_imp - T_START, "model_code_s": t_code - t_imp, "work_s": t_end - t_code,
                              "plan_s": r["timing_s"]["plan"], "convert_s": r["timing_s"]["convert"]}}))
"""


def _run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-3000:]}")
    line = next(l for l in out.splitlines() if l.startswith("RESULT ") or l.startswith("{"))
    res = json.loads(line.removeprefix("RESULT "))
    res.update({"process_wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024})
    return res


def _summary(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--tl-python", required=True, help="an interpreter with transformer_lens installed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path, default=ROOT / "benchmarks/results/vs_transformer_lens.json")
    a = ap.parse_args()
    for f in Path(a.src).glob("*.safetensors"):  # the input in the page cache for both tools
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    ours_cmd = [sys.executable, "-c", _OURS.format(threads=a.threads, root=str(ROOT), src=a.src, out=a.out)]
    tl_cmd = [a.tl_python, str(ROOT / "benchmarks/peer_transformer_lens.py"), a.src, "--no-eval",
              "--threads", str(a.threads)]
    runs: dict[str, list[dict]] = {"normsurgeon": [], "transformer_lens": []}
    for i in range(a.rounds):
        for tool, cmd in (("normsurgeon", ours_cmd), ("transformer_lens", tl_cmd)):
            shutil.rmtree(a.out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            res = _run(cmd)
            if tool == "transformer_lens":
                res = {"import_s": res["import_s"], "work_s": res["total_s"], "load_s": res["load_s"],
                       "process_s": res["process_s"], "process_wall_s": res["process_wall_s"],
                       "peak_rss_bytes": res["peak_rss_bytes"]}
            runs[tool].append(res)
            print(f"round {i + 1} {tool}: " + ", ".join(f"{k} {v:.3g}" for k, v in res.items()), file=sys.stderr)
    shutil.rmtree(a.out, ignore_errors=True)
    ckpt = sum(f.stat().st_size for f in Path(a.src).glob("*.safetensors"))
    result = {"checkpoint_bytes": ckpt, "rounds": a.rounds, "threads": a.threads,
              "load_average_at_end": os.getloadavg(), "runs": runs,
              "summary": {tool: _summary(r) for tool, r in runs.items()}}
    a.json_out.parent.mkdir(parents=True, exist_ok=True)
    a.json_out.write_text(json.dumps(result, indent=1))
    for tool, s in result["summary"].items():
        print(f"{tool:17s} " + "  ".join(f"{k} {v['median']:.3g}" for k, v in s.items()))


if __name__ == "__main__":
    main()
