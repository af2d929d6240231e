"""Train the tiny byte-level Llama that ships in ``examples/tiny-llama`` (the rotation study's Llama-family model).

A standard Hugging Face ``LlamaForCausalLM`` (Pre-RMSNorm, SwiGLU MLP, rotary positions, untied head) with a
256-symbol vocabulary (token id == byte value), trained for a few CPU minutes on the same standard-library
corpus and split as ``examples/tiny-gpt2`` (``stdlib_corpus.py``), evaluated on the same held-out windows.

Usage (from the repository root)::

    python examples/train_tiny_llama.py                          # default recipe (1000 steps; 6-11 min on 1 thread of a shared 2-core VM)
    python examples/train_tiny_llama.py --steps 20 --out /tmp/tl # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stdlib_corpus import bytes_to_tensor, corpus_description, heldout_loss, heldout_windows, load_stdlib_corpus  # noqa: E402

EVAL_WINDOWS, EVAL_LENGTH, EVAL_SEED = 64, 256, 1234  # the protocol of examples/tiny-gpt2


def build_model(seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny byte-level Llama (about 0.85M parameters)."""
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``peak * floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - length + 1, (batch,), generator=gen)  # [B]
    return data[starts[:, None] + torch.arange(length)[None, :]]  # [B, T]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="examples/tiny-llama")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=30.0, help="stop after this many minutes (a safety cap)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train = bytes_to_tensor(load_stdlib_corpus("train"))
    windows = heldout_windows(load_stdlib_corpus("heldout"), EVAL_WINDOWS, EVAL_LENGTH, EVAL_SEED)
    model = build_model(args.seed)
    n_params = sum(q.numel() for q in model.parameters())
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    loss_before = heldout_loss(model, windows)
    print(f"model: {n_params:,} parameters; held-out loss before: {loss_before:.4f}")
    model.train()
    t0, step = time.perf_counter(), 0
    for step in range(args.steps):
        if time.perf_counter() - t0 > 60 * args.minutes:
            print(f"time cap reached after {step} steps")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        ids = sample_batch(train, args.batch, args.length, gen)  # [B, T]
        logits = model(input_ids=ids).logits  # [B, T, 256]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    model.eval()
    loss_after = heldout_loss(model, windows)
    print(f"held-out loss after {step + 1} steps ({minutes:.1f} min): {loss_after:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    record = {
        "model": {"class": "transformers.LlamaForCausalLM", "parameters": n_params,
                  "vocab": "bytes: token id = byte value, vocab_size 256, no special tokens"},
        "training": {**vars(args), "steps_done": step + 1, "minutes": round(minutes, 2), "optimizer": "AdamW",
                     "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0, "schedule": "warm-up + cosine"},
        "evaluation": {"windows": EVAL_WINDOWS, "length": EVAL_LENGTH, "seed": EVAL_SEED,
                       "heldout_loss_before": round(loss_before, 4), "heldout_loss_after": round(loss_after, 4)},
        "corpus": corpus_description(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    (out / "README.md").write_text(
        "# tiny-llama: a byte-level Llama trained on the Python standard library\n\n"
        f"A standard `LlamaForCausalLM` (4 layers, width 128, 4 heads, SwiGLU 352, RMSNorm, untied head, "
        f"{n_params:,} parameters, float32), vocabulary = the 256 byte values (no tokenizer). Trained for "
        f"{step + 1} AdamW steps of {args.batch} x {args.length} bytes ({minutes:.1f} min, {args.threads} CPU "
        "threads) on the corpus of `examples/stdlib_corpus.py`; held-out loss (nats/byte, 64 fixed 256-byte "
        f"windows) {loss_before:.4f} before, **{loss_after:.4f}** after. Used by `benchmarks/bench_rotation.py` "
        "(docs/rotation.md). Reproduce: `python examples/train_tiny_llama.py`.\n")


if __name__ == "__main__":
    main()
