"""Train the tiny byte-level GPT-2 that ships in ``examples/tiny-gpt2``.

The model is a standard (Pre-LN) Hugging Face ``GPT2LMHeadModel`` with a
256-symbol vocabulary (token id == byte value), trained on the ``.py`` files of
the running interpreter's standard library (see ``stdlib_corpus.py`` for the
exact corpus and the train / held-out split).

Usage (from the repository root)::

    python examples/train_tiny_gpt2.py                      # default recipe
    python examples/train_tiny_gpt2.py --steps 50 --out /tmp/tiny   # smoke test

The output folder holds ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32), ``training.json`` (everything needed to
reproduce the numbers) and a short ``README.md``.
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
from transformers import GPT2Config, GPT2LMHeadModel

# Make the sibling helper importable however this script is launched.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stdlib_corpus import (  # noqa: E402
    bytes_to_tensor,
    corpus_description,
    heldout_loss,
    heldout_windows,
    load_stdlib_corpus,
)

# Standard evaluation protocol, shared with other recipes via stdlib_corpus.
EVAL_WINDOWS = 64
EVAL_LENGTH = 256
EVAL_SEED = 1234


def build_model(seed: int) -> GPT2LMHeadModel:
    """Return a freshly initialised tiny byte-level GPT-2 (about 0.86M parameters)."""
    config = GPT2Config(
        vocab_size=256,  # one token per byte value
        n_positions=256,  # context length
        n_embd=128,
        n_layer=4,
        n_head=4,  # head dim 32
        activation_function="gelu_new",
        resid_pdrop=0.0,  # no dropout: the model is small and trains briefly
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # raw bytes: no special tokens
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,  # lm_head.weight is wte.weight
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``peak * floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)  # 0 -> 1
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of ``length`` bytes from the 1-D token tensor ``data``: ``[batch, length]``."""
    starts = torch.randint(0, data.numel() - length + 1, (batch,), generator=gen)  # [B]
    offsets = torch.arange(length)  # [T]
    return data[starts[:, None] + offsets[None, :]]  # [B, T]


def next_byte_loss(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``ids[:, 1:]`` from ``ids[:, :-1]`` (nats/byte)."""
    logits = model(input_ids=ids).logits  # [B, T, 256]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),  # [B*(T-1), 256]
        ids[:, 1:].reshape(-1),  # [B*(T-1)]
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="examples/tiny-gpt2", help="output folder")
    p.add_argument("--steps", type=int, default=1800, help="optimizer steps (default: ~7.5 min on 1 idle thread at ~8k bytes/s)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and batch sampling")
    p.add_argument("--minutes", type=float, default=12.0, help="stop training after this many minutes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=8, help="windows per step (8 beat 16 at equal time)")
    p.add_argument("--length", type=int, default=256, help="bytes per training window")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    # ---- data -------------------------------------------------------------
    train = bytes_to_tensor(load_stdlib_corpus("train"))  # [N_train] int64
    windows = heldout_windows(load_stdlib_corpus("heldout"), EVAL_WINDOWS, EVAL_LENGTH, EVAL_SEED)  # [64, 256]
    corpus = corpus_description()
    print(f"corpus: {corpus['train']['files']} train files ({corpus['train']['bytes']:,} B), "
          f"{corpus['heldout']['files']} held-out files ({corpus['heldout']['bytes']:,} B)")

    # ---- model and optimiser ---------------------------------------------
    model = build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    print(f"model: {n_params:,} parameters")
    # Weight decay on matrices only (not on biases or LayerNorm parameters).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)

    loss_before = heldout_loss(model, windows)
    print(f"held-out loss before training: {loss_before:.4f} nats/byte (uniform = {math.log(256):.4f})")

    # ---- training loop ----------------------------------------------------
    model.train()
    t0 = time.perf_counter()
    recent: list[float] = []
    step = 0
    for step in range(args.steps):
        if time.perf_counter() - t0 > 60 * args.minutes:
            print(f"time cap of {args.minutes} min reached after {step} steps")
            break
        lr = lr_at(step, args.steps, args.lr, args.warmup, floor=0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = sample_batch(train, args.batch, args.length, gen)  # [B, T]
        loss = next_byte_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-args.log_every:]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - t0
            rate = (step + 1) * args.batch * args.length / elapsed
            print(f"step {step + 1:5d}  loss {sum(recent) / len(recent):.4f}  lr {lr:.2e}  "
                  f"{rate:,.0f} bytes/s  {elapsed:6.1f}s")
    else:
        step = args.steps
    steps_done = step
    train_seconds = time.perf_counter() - t0
    bytes_seen = steps_done * args.batch * args.length

    loss_after = heldout_loss(model, windows)
    print(f"held-out loss after training: {loss_after:.4f} nats/byte "
          f"({steps_done} steps, {train_seconds:.0f}s, {bytes_seen / train_seconds:,.0f} bytes/s)")

    # ---- save -------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32)
    # transformers >= 5 always writes safetensors (model.safetensors); the
    # tied lm_head.weight is not stored separately.
    model.save_pretrained(out)
    assert (out / "model.safetensors").is_file()
    from build_byte_tokenizer import write as write_tokenizer  # examples/: id == byte value, bos = newline

    write_tokenizer(out)

    record = {
        "model": {
            "class": "transformers.GPT2LMHeadModel",
            "vocab": "bytes: token id = byte value, vocab_size 256, no special tokens",
            "n_layer": model.config.n_layer,
            "n_head": model.config.n_head,
            "n_embd": model.config.n_embd,
            "n_positions": model.config.n_positions,
            "activation_function": model.config.activation_function,
            "layer_norm_epsilon": model.config.layer_norm_epsilon,
            "tie_word_embeddings": True,
            "dropout": 0.0,
            "parameters": n_params,
            "dtype": "float32",
        },
        "training": {
            "steps_requested": args.steps,
            "steps_done": steps_done,
            "seed": args.seed,
            "batch_windows": args.batch,
            "window_bytes": args.length,
            "bytes_seen": bytes_seen,
            "sampling": "uniform random window starts over the concatenated train split, "
                        "torch.Generator().manual_seed(seed), torch.randint per step",
            "optimizer": "AdamW betas=(0.9, 0.95), weight_decay 0.1 on >=2-D params, 0 otherwise",
            "lr_schedule": f"linear warm-up to {args.lr} over {args.warmup} steps, "
                           f"cosine decay to 10% of peak at step {args.steps}",
            "grad_clip_norm": 1.0,
            "threads": args.threads,
            "wall_seconds": round(train_seconds, 1),
            "bytes_per_second": round(bytes_seen / train_seconds),
            "final_train_loss_last_{}_steps".format(len(recent)): round(sum(recent) / max(1, len(recent)), 4),
        },
        "heldout_loss_nats_per_byte": {"before": loss_before, "after": loss_after},
        "evaluation_protocol": {
            "windows": f"stdlib_corpus.heldout_windows(load_stdlib_corpus('heldout'), "
                       f"n={EVAL_WINDOWS}, length={EVAL_LENGTH}, seed={EVAL_SEED})",
            "metric": f"mean next-byte cross-entropy (natural log) over all {EVAL_WINDOWS} x "
                      f"{EVAL_LENGTH - 1} predicted positions; each window fed whole, model.eval(), float32",
            "code": "stdlib_corpus.heldout_loss(model, windows)",
        },
        "corpus": corpus,
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
        },
        "command": "python examples/train_tiny_gpt2.py " + " ".join(sys.argv[1:]),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(README.format(
        params=n_params, steps=steps_done, seed=args.seed, minutes=train_seconds / 60,
        threads=args.threads, before=loss_before, after=loss_after, py=corpus["python_version"],
        train_files=corpus["train"]["files"], train_bytes=corpus["train"]["bytes"],
        held_files=corpus["heldout"]["files"], held_bytes=corpus["heldout"]["bytes"],
        torch=torch.__version__, tf=transformers.__version__, batch=args.batch, length=args.length,
        bytes_seen=bytes_seen,
    ))
    print(f"saved to {out}")


README = """\
# tiny-gpt2: a byte-level GPT-2 trained on the Python standard library

A deliberately tiny, standard Hugging Face `GPT2LMHeadModel` (Pre-LN GPT-2 with
biases and LayerNorm), used as the embedded example model of `normsurgeon`.

* 4 layers, 4 heads, width 128, context 256, GELU MLP (4x), tied embeddings,
  {params:,} parameters, float32 safetensors.
* Vocabulary: the 256 byte values, token id == byte value, no special tokens. The
  byte-level `tokenizer.json` (written by `examples/build_byte_tokenizer.py`) encodes
  exactly that, so `AutoTokenizer` and `pipeline("text-generation", model=...)` work;
  by hand: `list(text.encode("utf-8"))` and `bytes(ids).decode("utf-8", "replace")`.
  Generation without a prompt starts from a newline (`bos_token_id` 10); nothing
  marks an end (no `eos_token_id`), so it stops at `max_new_tokens`.
* Corpus: the `.py` files of the Python {py} standard library (skipping
  `test`/`tests`, `idlelib`, `lib2to3`, `site-packages`), split by file:
  {train_files} files / {train_bytes:,} bytes for training, every 20th file
  ({held_files} files / {held_bytes:,} bytes) held out. See `examples/stdlib_corpus.py`.
* Training: {steps} AdamW steps of {batch} random {length}-byte windows
  ({bytes_seen:,} bytes seen), warm-up + cosine LR, grad clipping, seed {seed},
  {minutes:.1f} min on {threads} CPU thread(s); torch {torch}, transformers {tf}.

Held-out loss (mean next-byte cross-entropy, nats/byte, on 64 fixed 256-byte
held-out windows; uniform would be 5.545):

| before training | after training |
|-----------------|----------------|
| {before:.4f}          | {after:.4f}         |

Reproduce with `python examples/train_tiny_gpt2.py` (all settings, versions and
the exact evaluation protocol are in `training.json`). Re-check the number:

```python
import sys; sys.path.insert(0, "examples")
from transformers import AutoModelForCausalLM
from stdlib_corpus import load_stdlib_corpus, heldout_windows, heldout_loss
model = AutoModelForCausalLM.from_pretrained("examples/tiny-gpt2")
windows = heldout_windows(load_stdlib_corpus("heldout"), n=64, length=256, seed=1234)
print(heldout_loss(model, windows))
```

The held-out text depends on the Python version's standard library, so the
number is only reproducible to the digit with Python {py}.
"""


if __name__ == "__main__":
    main()
