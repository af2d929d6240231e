"""Throughput and peak memory of `remove-ln --finetune` training steps on CPU.

Measures optimizer steps on the shipped tiny GPT-2 (examples/tiny-gpt2) with the example's batch
(16 x 256 bytes) in four states, each in its own process (so peak RSS is per state):
- stock:      the unmodified model (the with-norm control run),
- live:       FixedScaleNorm installed, every norm real and tracking its scale (the first steps),
- transition: every attention norm with q/k fake and v real (the value columns are recomputed),
- norm-free:  every norm fake (the rest of the run).

    python benchmarks/bench_remove_ln.py [--steps 12] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATES = ("stock", "live", "transition", "norm-free")


def run_state(state: str, steps: int, threads: int, batch: int, block: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from examples.stdlib_corpus import load_stdlib_corpus
    from normsurgeon.io.loader import load_model
    from normsurgeon.lnfree.sites import install
    from normsurgeon.train.config import TrainConfig
    from normsurgeon.train.data import ByteTokenizer, TokenData
    from normsurgeon.train.loop import train

    model = load_model(str(ROOT / "examples/tiny-gpt2")).model
    if state != "stock":
        sites = install(model)
        for s in sites.sites:
            m = sites.module(s.name)
            if state == "transition":
                m.set_fake(s.role == "attn", False)
            elif state == "norm-free":
                m.set_fake(True, True)
    tok = ByteTokenizer()
    train_ids = torch.tensor(tok.encode(load_stdlib_corpus("train")[:2_000_000]))
    data = TokenData(train_ids, train_ids[:10_000], {})
    cfg = TrainConfig(steps=steps + 2, batch_size=batch, block_size=block, checkpoint_every=10**6, eval_windows=1)
    t0 = time.perf_counter()
    res = train(model, data, cfg)
    wall = time.perf_counter() - t0
    return {"state": state, "tokens_per_second": res.tokens_per_second, "steps": cfg.steps, "wall_s": round(wall, 2),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--json", type=Path)
    p.add_argument("--state", choices=STATES, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.state:
        print(json.dumps(run_state(a.state, a.steps, a.threads, a.batch, a.block)))
        return
    rows = []
    for state in STATES:
        out = subprocess.run([sys.executable, __file__, "--state", state, "--steps", str(a.steps), "--threads",
                              str(a.threads), "--batch", str(a.batch), "--block", str(a.block)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{state:11s} {rows[-1]['tokens_per_second']:8.0f} tokens/s  peak RSS {rows[-1]['peak_rss_mb']:6.0f} MB",
              flush=True)
    import torch
    import transformers

    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": a.threads,
                          "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__},
              "batch": f"{a.batch} x {a.block} tokens", "timed_steps": a.steps, "rows": rows}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
