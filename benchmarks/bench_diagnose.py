"""Benchmark: ``diagnose`` on a 124M-parameter GPT-2-shaped model (random weights, GPT-2 small config),
8 sequences of 512 tokens, on the CPU. Target: under a minute on 2 cores.

    python benchmarks/bench_diagnose.py [--threads 2] [--removal-seqs N] [--json out.json]

Prints the wall time of each phase (stats pass = forward + backward with hooks; layer removal; plots +
report writing) and the total, with the settings and the machine's load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--removal-seqs", type=int, default=None)
    ap.add_argument("--grad-seqs", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers as T

    from normsurgeon.diagnose.compute import diagnose_model
    from normsurgeon.diagnose.plots import write_plots
    from normsurgeon.diagnose.report import to_html, to_markdown

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config()).eval()  # 124M parameters
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (args.num_seqs, args.seq_len), generator=torch.Generator().manual_seed(0))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    d = diagnose_model(model, ids, micro_batch=args.micro_batch, removal_sequences=args.removal_seqs,
                       grad_sequences=args.grad_seqs)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plots, _ = write_plots(d, Path(tmp), "bench")
        rep = {"model": "gpt2-124M-random", **d.to_dict()}
        (Path(tmp) / "report.md").write_text(to_markdown(rep, plots, "bench"))
        (Path(tmp) / "report.html").write_text(to_html(rep, plots, "bench"))
    t2 = time.perf_counter()
    result = {"params": n_params, "threads": args.threads, "sequences": args.num_seqs, "seq_len": args.seq_len,
              "micro_batch": args.micro_batch, "removal_sequences": d.settings["removal_sequences"], "grad_sequences": d.settings["grad_sequences"],
              **{k: round(v, 2) for k, v in d.timings.items()}, "report_s": round(t2 - t1, 2),
              "total_s": round(t2 - t0, 2), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
