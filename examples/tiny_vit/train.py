"""Train the tiny ViT on sklearn digits and write ``checkpoint/`` (config.json + model.safetensors).

    python examples/tiny_vit/train.py        # under a minute on one CPU thread
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.tiny_vit.vit import CHECKPOINT, load_digits_split, tiny_vit_config  # noqa: E402


def main(epochs: int = 60, batch: int = 64, lr: float = 3e-3, weight_decay: float = 0.1, seed: int = 0) -> None:
    import transformers as T

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    model = T.ViTForImageClassification(tiny_vit_config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(y_tr) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr))
        for i in range(0, len(perm), batch):
            b = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x_tr[b]).logits, y_tr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(pixel_values=x_te).logits.argmax(-1) == y_te).float().mean().item()
    n = sum(p.numel() for p in model.parameters())
    print(f"test accuracy {acc:.4f} on {len(y_te)} images; {n:,} parameters; {time.perf_counter() - t0:.0f} s")
    model.save_pretrained(str(CHECKPOINT))
    info = {"test_accuracy": acc, "test_images": len(y_te), "parameters": n, "epochs": epochs, "batch": batch,
            "lr": lr, "weight_decay": weight_decay, "seed": seed, "torch": torch.__version__, "transformers": T.__version__}
    (CHECKPOINT / "training.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
