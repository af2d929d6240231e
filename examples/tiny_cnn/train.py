"""Train ``TinyCNN`` on sklearn digits and write ``model.safetensors`` beside this file (~10 s on CPU).

    python examples/tiny_cnn/train.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.tiny_cnn.model import WEIGHTS, TinyCNN, load_digits_split  # noqa: E402


def main(epochs: int = 30, seed: int = 0) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr))
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x_tr[b]), y_tr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(-1) == y_te).float().mean().item()
    print(f"test accuracy {acc:.4f} on {len(y_te)} images")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
