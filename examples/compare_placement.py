"""Train tiny byte-level Llama models under several norm placements from scratch on the standard-library
corpus (CPU, a few minutes), diagnose each, and write the table and plots used in docs/placement.md.

    python examples/compare_placement.py [--schemes pre,peri,lns,mix,post] [--layers 16] [--steps 200]
                                         [--seeds 0] [--out docs/placement_compare]

Set-up (the research pilot's, docs/placement.md): vocabulary 256 bytes, d=64, 4 heads, SwiGLU 170,
seq 64, batch 16, AdamW (0.9, 0.95), wd 0, lr 2e-3, 10% warm-up then cosine to 10%, no clipping, fp32,
one thread. Every scheme starts from the same Pre-LN initialisation (same seed) and is placed with
``normsurgeon.placement`` in from-scratch mode (peri with an embedding norm). Training uses the shared
loop ``normsurgeon.train.loop.train``; diagnostics use ``normsurgeon.diagnose.compute.diagnose_model`` on
8 held-out windows at initialisation and after training.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCHEME_OPTIONS = {"peri": {"embedding_norm": True}, "mix": {"alpha": 0.25}}


def build(layers: int, seed: int):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=170, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return T.LlamaForCausalLM(cfg)


def run_one(scheme: str, layers: int, steps: int, seed: int, data, eval_ids) -> dict:
    from normsurgeon.diagnose.compute import diagnose_model
    from normsurgeon.placement.apply import place
    from normsurgeon.placement.spec import build_spec
    from normsurgeon.train.config import TrainConfig
    from normsurgeon.train.evaluate import heldout_loss
    from normsurgeon.train.loop import train

    model = build(layers, seed)
    place(model, build_spec(scheme, layers, SCHEME_OPTIONS.get(scheme)), mode="fresh")
    d0 = diagnose_model(model, eval_ids, micro_batch=4, removal=False)
    cfg = TrainConfig(steps=steps, lr=2e-3, warmup_steps=steps // 10, weight_decay=0.0, grad_clip=None,
                      batch_size=16, block_size=64, seed=seed, checkpoint_every=10**9, eval_windows=32,
                      max_backoffs=0)
    t0 = time.perf_counter()
    res = train(model, data, cfg)
    wall = time.perf_counter() - t0
    model.eval()
    d1 = diagnose_model(model, eval_ids, micro_batch=4)
    return {"scheme": scheme, "seed": seed, "layers": layers, "steps": steps, "train_s": wall,
            "eval_loss": heldout_loss(model, eval_ids), "init": d0.to_dict(), "final": d1.to_dict(),
            "train_loss": [h["ce"] for h in res.history], "grad_norm": [h["grad_norm"] for h in res.history]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="pre,peri,lns,mix,post")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, default=Path("docs/placement_compare"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from stdlib_corpus import bytes_to_tensor, corpus_description, load_stdlib_corpus

    from normsurgeon.train.data import TokenData, heldout_windows

    data = TokenData(bytes_to_tensor(load_stdlib_corpus("train")), bytes_to_tensor(load_stdlib_corpus("heldout")), {})
    eval_ids = heldout_windows(data.heldout, 8, 64, 1234)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for scheme in args.schemes.split(","):
            r = run_one(scheme, args.layers, args.steps, seed, data, eval_ids)
            results.append(r)
            print(f"{scheme:6s} seed {seed}: eval loss {r['eval_loss']:.4f}  E[h²] L/1 "
                  f"{r['final']['summary']['second_moment_last_over_first']:.3g}  gn max/min "
                  f"{r['final']['summary']['grad_norm_max_over_min']:.3g}  ({r['train_s']:.0f} s)", flush=True)
            (args.out / "results.json").write_text(json.dumps({"corpus": corpus_description(), "results": results}, indent=1))
    write_table(results, args.out)
    write_plots(results, args.out)


def write_table(results: list[dict], out: Path) -> None:
    from normsurgeon.markdown import md_table

    head = ["scheme", "seed", "eval loss", "E[h²] L/1 init", "E[h²] L/1 final", "max top1/median final",
            "block gn max/min", "FFN gn max/min", "FFN gn CV", "ang deep/shallow", "removal Δ deep half", "train s"]
    body = []
    for r in results:
        s0, s1 = r["init"]["summary"], r["final"]["summary"]
        body.append([r["scheme"], r["seed"], f"{r['eval_loss']:.3f}", f"{s0['second_moment_last_over_first']:.3g}",
                     f"{s1['second_moment_last_over_first']:.3g}", f"{s1['max_massive_ratio']:.3g}",
                     f"{s1['grad_norm_max_over_min']:.3g}", f"{s1['ffn_grad_norm_max_over_min']:.3g}",
                     f"{s1['ffn_grad_norm_cv']:.3g}", f"{s1['angular_deep_over_shallow']:.3g}",
                     f"{s1['removal_mean_deep_half']:+.4f}", f"{r['train_s']:.0f}"])
    table = md_table(head, body)
    (out / "table.md").write_text(table + "\n")
    print(table)


def write_plots(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed0 = [r for r in results if r["seed"] == min(x["seed"] for x in results)]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for r in seed0:
        for a, key, stage in ((ax[0], "second_moment", "final"), (ax[1], "grad_norm_block", "final"),
                              (ax[2], "second_moment", "init")):
            layers = r[stage]["layers"]
            a.plot([x["layer"] for x in layers], [x[key] for x in layers], "o-", ms=3, label=r["scheme"])
    ax[0].set(yscale="log", xlabel="block", ylabel="E[h²] of block output", title="hidden-state second moment (trained)")
    ax[1].set(yscale="log", xlabel="block", ylabel="‖∇ block params‖", title="block gradient norms (trained, held-out)")
    ax[2].set(yscale="log", xlabel="block", ylabel="E[h²]", title="hidden-state second moment (init)")
    from matplotlib.ticker import MaxNLocator

    for a in ax:
        a.legend(fontsize=8)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "depth_profiles.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in seed0:
        k = 10
        v = r["train_loss"]
        ax.plot([sum(v[max(0, i - k):i + 1]) / len(v[max(0, i - k):i + 1]) for i in range(len(v))], label=r["scheme"])
    ax.set(xlabel="step", ylabel="train loss (10-step mean)", title="training curves")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
